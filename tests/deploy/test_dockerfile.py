"""deploy/Dockerfile builds what the manifests run — checked without a container engine.

The Dockerfile's steps are executed as written, in an empty directory standing for the image's
WORKDIR: every COPY copies what it names from the repository, every RUN runs in bash, except the
pip installs (they need PyTorch's wheel index; this test's virtualenv, installed from the same
requirements.txt, stands in for the image's site-packages). Then, with the image's ENV (its
PYTHONPATH mapped onto the directory) and the repository removed from sys.path, every module a
manifest starts is imported from the result. What this cannot check: the base image, the pip
installs themselves, USER/file permissions, and the HEALTHCHECK at run time.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.manifests import REPO_ROOT, render, service_workloads

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    steps, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += (" " if current else "") + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = current.partition(" ")
            steps.append((keyword.upper(), rest.strip()))
            current = ""
    return steps


def image_env(steps) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in steps:
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("image")
    steps = instructions(DOCKERFILE.read_text())
    workdir = next(rest for keyword, rest in steps if keyword == "WORKDIR")
    app = root / workdir.lstrip("/")
    app.mkdir(parents=True)
    # `python` in RUN steps is the image's interpreter: here, this test's.
    bin_dir = root / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python"        # not a symlink: the virtualenv is found from the path run
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    run_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(root)}
    ran = []
    for keyword, rest in steps:
        if keyword == "COPY":
            *sources, destination = shlex.split(rest)
            for source in sources:
                target = app / destination if destination != "." else app / Path(source).name
                if (REPO_ROOT / source).is_dir():
                    shutil.copytree(REPO_ROOT / source, target,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy(REPO_ROOT / source, target)
        elif keyword == "RUN":
            if "pip install" in rest:
                continue          # the virtualenv stands in (see the module docstring)
            subprocess.run(["bash", "-euc", rest], cwd=app, env=run_env, check=True)
            ran.append(rest)
    assert ran, "the Dockerfile has no RUN step besides the pip installs"
    env = image_env(steps)
    mapped = {name: value.replace(workdir, str(app)) for name, value in env.items()}
    return app, mapped


def test_the_build_generates_the_protos_into_gen(built):
    app, _ = built
    assert (app / "gen" / "deltarec" / "v1" / "ranker_pb2_grpc.py").is_file()
    assert (app / "gen" / "deltarec" / "v1" / "__init__.py").is_file()
    # Compiled at build time: the root filesystem is read-only in the pods.
    assert list((app / "services" / "common").glob("__pycache__/server.*.pyc"))


def test_every_module_the_manifests_start_imports_from_the_image(built):
    app, env = built
    modules = sorted({workload.module for workload in service_workloads(render("dev"))})
    assert "services.collector" in modules and "services.ranker" in modules
    modules.append("services.status")          # the image's HEALTHCHECK
    code = (
        "import importlib, sys\n"
        # The virtualenv's .pth file puts the repository on sys.path: take it (and only it) off.
        f"sys.path[:] = [p for p in sys.path if p not in ({str(REPO_ROOT)!r}, {str(REPO_ROOT / 'gen')!r}, '')]\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name + '.__main__')\n"
        f"    assert module.__file__.startswith({str(app)!r}), module.__file__\n"
        "    print('imported', name, module.__file__)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], **env, "HOME": str(app)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("imported") == len(modules)


def test_the_image_defaults_match_the_manifests(built):
    _, env = built
    workloads = service_workloads(render("dev"))
    for workload in workloads:
        assert workload.grpc_port == int(env["GRPC_PORT"]), workload.name
        assert workload.metrics_port == int(env["METRICS_PORT"]), workload.name
