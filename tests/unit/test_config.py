"""services/common/config.py: environment variables read, converted and checked once, at start,
with one clear message naming the variable."""
# No `from __future__ import annotations` here on purpose: the dataclass below has real types as
# field annotations, while the services' configs (string annotations) cover the other path.
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.collector.config import CollectorConfig
from services.common.config import CommonConfig, ConfigError, describe, env, load

REPO_ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1:5432/deltarec"}


@dataclasses.dataclass(frozen=True)
class Sample:
    name: str = env("SAMPLE_NAME", help="a required name")
    workers: int = env("SAMPLE_WORKERS", 4, minimum=1, maximum=64)
    ratio: float = env("SAMPLE_RATIO", 0.5, minimum=0.0, maximum=1.0)
    verbose: bool = env("SAMPLE_VERBOSE", False)
    mode: str = env("SAMPLE_MODE", "fast", choices=("fast", "safe"))
    code: str = env("SAMPLE_CODE", "AB1", pattern=r"[A-Z]{2}\d")
    not_from_env: int = 7


def error_of(cls, environ) -> str:
    with pytest.raises(ConfigError) as info:
        load(cls, environ)
    return str(info.value)


def test_defaults_apply_when_variables_are_absent():
    config = load(Sample, {"SAMPLE_NAME": "x"})
    assert config == Sample(name="x", workers=4, ratio=0.5, verbose=False, mode="fast", code="AB1",
                            not_from_env=7)


def test_common_config_defaults():
    config = load(CommonConfig, MINIMAL)
    assert config.database_url == MINIMAL["DATABASE_URL"]
    assert (config.etcd_endpoint, config.etcd_prefix) == ("127.0.0.1:2379", "/deltarec/")
    assert (config.grpc_port, config.metrics_port, config.grpc_workers) == (0, 0, 16)
    assert config.shutdown_grace_s == 10.0 and config.log_level == "INFO"


def test_service_config_inherits_the_common_fields_and_converts_string_annotations():
    config = load(CollectorConfig, {**MINIMAL, "GRPC_PORT": "50051", "COLLECTOR_MAX_BATCH": "250",
                                    "COLLECTOR_MAX_CLOCK_SKEW_S": "2.5", "COLLECTOR_ID": "c-1",
                                    "SHUTDOWN_GRACE_S": "3"})
    assert (config.grpc_port, config.max_batch, config.max_clock_skew_s) == (50051, 250, 2.5)
    assert isinstance(config.grpc_port, int) and isinstance(config.shutdown_grace_s, float)
    assert config.replica_id == "c-1" and config.max_batch == 250


def test_values_are_converted_to_the_field_type():
    config = load(Sample, {"SAMPLE_NAME": "n", "SAMPLE_WORKERS": " 12 ", "SAMPLE_RATIO": "1e-1"})
    assert config.workers == 12 and config.ratio == pytest.approx(0.1)


@pytest.mark.parametrize("raw,expected", [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), (" On ", True),
    ("0", False), ("false", False), ("no", False), ("off", False), ("", False)])
def test_booleans(raw, expected):
    assert load(Sample, {"SAMPLE_NAME": "n", "SAMPLE_VERBOSE": raw}).verbose is expected


@pytest.mark.parametrize("variable,raw,kind", [
    ("SAMPLE_WORKERS", "four", "int"), ("SAMPLE_WORKERS", "2.5", "int"), ("SAMPLE_WORKERS", "", "int"),
    ("SAMPLE_RATIO", "half", "float"), ("SAMPLE_VERBOSE", "maybe", "bool")])
def test_conversion_errors_name_the_variable_the_value_and_the_type(variable, raw, kind):
    assert error_of(Sample, {"SAMPLE_NAME": "n", variable: raw}) == f"{variable}={raw!r}: expected {kind}"


def test_conversion_errors_for_string_annotated_configs():
    assert error_of(CommonConfig, {**MINIMAL, "GRPC_PORT": "http"}) == "GRPC_PORT='http': expected int"
    assert error_of(CommonConfig, {**MINIMAL, "SHUTDOWN_GRACE_S": "soon"}) == \
        "SHUTDOWN_GRACE_S='soon': expected float"


@pytest.mark.parametrize("variable,raw,message", [
    ("SAMPLE_WORKERS", "0", "SAMPLE_WORKERS=0: must be >= 1"),
    ("SAMPLE_WORKERS", "65", "SAMPLE_WORKERS=65: must be <= 64"),
    ("SAMPLE_RATIO", "-0.01", "SAMPLE_RATIO=-0.01: must be >= 0.0"),
    ("SAMPLE_RATIO", "1.5", "SAMPLE_RATIO=1.5: must be <= 1.0"),
    ("SAMPLE_MODE", "turbo", "SAMPLE_MODE='turbo': must be one of fast, safe"),
    ("SAMPLE_CODE", "AB12", r"SAMPLE_CODE='AB12': must match [A-Z]{2}\d"),
    ("SAMPLE_CODE", "ab1", r"SAMPLE_CODE='ab1': must match [A-Z]{2}\d"),
])
def test_checks_name_the_variable_and_the_rule(variable, raw, message):
    assert error_of(Sample, {"SAMPLE_NAME": "n", variable: raw}) == message


@pytest.mark.parametrize("variable,raw", [("SAMPLE_WORKERS", "1"), ("SAMPLE_WORKERS", "64"),
                                          ("SAMPLE_RATIO", "0"), ("SAMPLE_RATIO", "1"),
                                          ("SAMPLE_MODE", "safe"), ("SAMPLE_CODE", "ZZ9")])
def test_bounds_and_choices_are_inclusive(variable, raw):
    load(Sample, {"SAMPLE_NAME": "n", variable: raw})


@pytest.mark.parametrize("variable", ["SAMPLE_RATIO"])
@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf"])
def test_non_finite_numbers_do_not_slip_past_the_bounds(variable, raw):
    assert error_of(Sample, {"SAMPLE_NAME": "n", variable: raw}).startswith(f"{variable}=")


def test_nan_is_refused_even_without_bounds():
    @dataclasses.dataclass(frozen=True)
    class Unbounded:
        delay: float = env("SAMPLE_DELAY", 1.0)
    assert error_of(Unbounded, {"SAMPLE_DELAY": "nan"}) == "SAMPLE_DELAY='nan': expected float"
    assert load(Unbounded, {"SAMPLE_DELAY": "inf"}).delay == float("inf")


def test_pattern_must_match_the_whole_value():
    assert "ETCD_ENDPOINT" in error_of(CommonConfig, {**MINIMAL, "ETCD_ENDPOINT": "localhost"})
    assert "ETCD_ENDPOINT" in error_of(CommonConfig, {**MINIMAL, "ETCD_ENDPOINT": "etcd:2379/x"})
    assert error_of(CommonConfig, {**MINIMAL, "ETCD_PREFIX": "deltarec"}) == \
        "ETCD_PREFIX='deltarec': must match /.*/"
    assert load(CommonConfig, {**MINIMAL, "ETCD_ENDPOINT": "[::1]:2379"}).etcd_endpoint == "[::1]:2379"


@pytest.mark.parametrize("variable,raw", [("GRPC_PORT", "-1"), ("GRPC_PORT", "65536"),
                                          ("METRICS_PORT", "70000"), ("GRPC_WORKERS", "0"),
                                          ("SHUTDOWN_GRACE_S", "601"), ("LOG_LEVEL", "TRACE"),
                                          ("COLLECTOR_MAX_BATCH", "0"), ("COLLECTOR_MAX_CLOCK_SKEW_S", "-1")])
def test_service_settings_are_checked(variable, raw):
    assert error_of(CollectorConfig, {**MINIMAL, variable: raw}).startswith(f"{variable}=")


def test_required_variables():
    assert error_of(Sample, {}) == "SAMPLE_NAME is required (a required name)"
    assert error_of(CommonConfig, {}) == \
        "DATABASE_URL is required (SQLAlchemy URL of the Postgres database)"


def test_only_the_given_mapping_is_read(monkeypatch):
    monkeypatch.setenv("SAMPLE_NAME", "from-os")
    monkeypatch.setenv("SAMPLE_WORKERS", "9")
    assert load(Sample).name == "from-os" and load(Sample).workers == 9
    assert load(Sample, {"SAMPLE_NAME": "given"}).workers == 4


def test_describe_lists_variables_defaults_and_help():
    rows = {name: (default, help_) for name, default, help_ in describe(Sample)}
    assert set(rows) == {"SAMPLE_NAME", "SAMPLE_WORKERS", "SAMPLE_RATIO", "SAMPLE_VERBOSE",
                         "SAMPLE_MODE", "SAMPLE_CODE"}
    assert rows["SAMPLE_NAME"] == ("", "a required name") and rows["SAMPLE_WORKERS"][0] == "4"


def test_a_service_with_a_bad_setting_exits_at_start_with_one_clear_line():
    environ = {**os.environ, **MINIMAL, "GRPC_PORT": "not-a-port",
               "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "gen")])}
    result = subprocess.run([sys.executable, "-m", "services.collector"], env=environ, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "collector: configuration error: GRPC_PORT='not-a-port': expected int"


def test_a_value_can_come_from_the_file_named_by_name_FILE(tmp_path):
    """Kubernetes mounts the Secret as a file; DATABASE_URL_FILE points at it."""
    secret = tmp_path / "DATABASE_URL"
    secret.write_text("postgresql+psycopg2://u:p@db:5432/deltarec\n")
    config = load(CommonConfig, {"DATABASE_URL_FILE": str(secret)})
    assert config.database_url == "postgresql+psycopg2://u:p@db:5432/deltarec"


def test_value_file_errors_name_the_variable(tmp_path):
    with pytest.raises(ConfigError, match=r"DATABASE_URL_FILE=.*cannot read"):
        load(CommonConfig, {"DATABASE_URL_FILE": str(tmp_path / "missing")})
    both = {"DATABASE_URL": "x", "DATABASE_URL_FILE": str(tmp_path / "missing")}
    with pytest.raises(ConfigError, match="both set"):
        load(CommonConfig, both)
