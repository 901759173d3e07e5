"""The contracts: the protos pass `buf lint`, and the Python code in gen/ (generated at build time by
`make protos`, git-ignored, never committed) is current with them."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
GEN = REPO_ROOT / "gen"
BUF = ["npx", "-y", "@bufbuild/buf@1.75.0"]
PROTOS = sorted((PROTO_ROOT / "deltarec" / "v1").glob("*.proto"))
SERVICES = {"collector", "features", "trainer", "ranker", "consistency"}


def buf_lint(folder: Path) -> subprocess.CompletedProcess:
    if shutil.which("npx") is None:
        pytest.skip("npx is not installed (Node.js ships it; `make system-deps` installs it)")
    return subprocess.run(BUF + ["lint"], cwd=folder, capture_output=True, text=True, timeout=300)


def test_there_is_one_proto_per_service_plus_common():
    assert {path.stem for path in PROTOS} == SERVICES | {"common"}


def test_protos_pass_buf_lint():
    result = buf_lint(PROTO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_does_catch_a_bad_proto(tmp_path):
    # Guards the test above against passing vacuously (wrong folder, no module, no rules).
    shutil.copytree(PROTO_ROOT, tmp_path / "protos")
    (tmp_path / "protos" / "deltarec" / "v1" / "bad.proto").write_text(
        'syntax = "proto3";\npackage deltarec.v1;\nenum color { RED = 0; }\nmessage thing { string Name = 1; }\n')
    result = buf_lint(tmp_path / "protos")
    assert result.returncode != 0
    assert "bad.proto" in result.stdout + result.stderr


def generated_files(stem: str) -> list[Path]:
    folder = GEN / "deltarec" / "v1"
    return [folder / f"{stem}_pb2.py", folder / f"{stem}_pb2_grpc.py", folder / f"{stem}_pb2.pyi"]


@pytest.mark.parametrize("proto", PROTOS, ids=lambda path: path.name)
def test_generated_code_is_not_older_than_its_proto(proto):
    for generated in generated_files(proto.stem):
        assert generated.exists(), f"{generated.relative_to(REPO_ROOT)} missing: run `make protos`"
        assert generated.stat().st_mtime >= proto.stat().st_mtime, \
            f"{generated.relative_to(REPO_ROOT)} is older than {proto.relative_to(REPO_ROOT)}: run `make protos`"


def test_generated_code_is_what_the_protos_generate_now(tmp_path):
    # Stronger than timestamps: regenerate exactly as the Makefile does and compare the bytes.
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}"] + [str(path) for path in PROTOS],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    stale = []
    for proto in PROTOS:
        for generated in generated_files(proto.stem):
            fresh = tmp_path / generated.relative_to(GEN)
            if not generated.exists() or generated.read_bytes() != fresh.read_bytes():
                stale.append(str(generated.relative_to(REPO_ROOT)))
    assert not stale, f"stale generated code, run `make protos`: {stale}"


def test_gen_is_git_ignored_and_not_committed():
    ignored = subprocess.run(["git", "check-ignore", "-q", "gen/deltarec/v1/common_pb2.py"], cwd=REPO_ROOT)
    assert ignored.returncode == 0
    tracked = subprocess.run(["git", "ls-files", "gen"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert tracked.stdout.strip() == ""
