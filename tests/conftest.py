"""Fixtures shared by all tests.

Integration tests use the real thing: the project's own Postgres cluster and etcd
server (started by scripts/infra.py, the same code path as `make run`; `make test`
starts them first and the fixtures reuse them), and real gRPC servers started as
processes by scripts/launch.py. Each test module gets a database of its own and
each test an etcd prefix of its own, so tests do not see each other's data.
"""
from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa

from scripts import infra
from scripts.launch import ServiceProcess
from tests.support import REPO_ROOT


@pytest.fixture(scope="session")
def infra_env() -> infra.InfraEnv:
    os.environ.setdefault("DELTAREC_PG_FAST", "1")
    return infra.start(os.environ.get("DELTAREC_INFRA_DIR", REPO_ROOT / ".run" / "test-infra"))


@pytest.fixture(scope="module")
def database_url(infra_env, request) -> str:
    """A fresh, migrated database for the test module."""
    name = "t_" + uuid.uuid4().hex[:12]
    url = infra.create_database(infra_env, name)
    yield url
    infra.drop_database(infra_env, name)


@pytest.fixture(scope="module")
def engine(database_url):
    engine = sa.create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def etcd_prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:10]}/"


@pytest.fixture
def service_env(infra_env, database_url, etcd_prefix) -> dict[str, str]:
    """Environment for a service process under test."""
    return {"DATABASE_URL": database_url, "ETCD_ENDPOINT": infra_env.etcd_endpoint,
            "ETCD_PREFIX": etcd_prefix, "GRPC_PORT": "0", "METRICS_PORT": "0",
            "LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_S": "5"}


@pytest.fixture
def start_service(tmp_path):
    """start_service("services.collector", env, name=...) -> a running ServiceProcess; all are
    stopped at the end of the test."""
    started: list[ServiceProcess] = []

    def start(module: str, env: dict[str, str], name: str | None = None, timeout_s: float = 120.0):
        process = ServiceProcess(module, env, name=name, log_dir=tmp_path / "logs").start(timeout_s)
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop(timeout_s=15)
