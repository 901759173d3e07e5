"""Helpers shared by the integration tests."""
from __future__ import annotations

import time

import sqlalchemy as sa


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


def wal_lsn(engine) -> int:
    """The WAL insert position: with synchronous_commit off, pg_current_wal_lsn() can be below
    one's own commit; pg_current_wal_insert_lsn() never is."""
    with engine.connect() as connection:
        return int(connection.execute(sa.text("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")).scalar())
