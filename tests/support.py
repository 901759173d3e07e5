"""Helpers shared by the tests, each written once (fixtures are in conftest.py; the CDC tests'
own consumers and raw streams in integration/cdc_support.py; fakes of other services and model
artifacts in fakes.py). A free port comes from scripts/infra.py (`infra.free_port`), the one the
infrastructure itself uses."""
from __future__ import annotations

import time
from pathlib import Path

import grpc
import sqlalchemy as sa

from scripts.launch import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate, what: str = "condition", timeout_s: float = 120.0, interval_s: float = 0.05):
    """Polls until predicate() is truthy and returns its value. The deadline only guards against a
    hang; it is not an assertion on timing."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout_s:.0f}s")
        time.sleep(interval_s)


def channel_to(process: ServiceProcess) -> grpc.Channel:
    """A channel to a service process, once it connects."""
    channel = grpc.insecure_channel(process.address)
    grpc.channel_ready_future(channel).result(timeout=10)
    return channel


def wal_lsn(engine) -> int:
    """The WAL insert position: with synchronous_commit off, pg_current_wal_lsn() can be below
    one's own commit; pg_current_wal_insert_lsn() never is."""
    with engine.connect() as connection:
        return int(connection.execute(sa.text("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")).scalar())


def count_events(engine, prefix: str) -> int:
    """Rows of `events` whose event_id starts with `prefix` (each test uses a prefix of its own)."""
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT count(*) FROM events WHERE event_id LIKE :p"),
                                  {"p": prefix + "%"}).scalar_one()
