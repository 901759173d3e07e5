"""SQLAlchemy 2.0 engine and sessions, and the schema migrations entry point."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str, *, pool_size: int = 10, application_name: str = "deltarec") -> Engine:
    return sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # A connection broken by a Postgres restart is detected and replaced before use.
        pool_pre_ping=True,
        pool_timeout=10,
        connect_args={"application_name": application_name, "connect_timeout": 5},
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextlib.contextmanager
def transaction(engine: Engine) -> Iterator[sa.Connection]:
    """One transaction on a pooled connection: committed on success, rolled back on error."""
    with engine.begin() as connection:
        yield connection


def raw_connection(engine: Engine):
    """The psycopg2 connection behind a pooled one, for COPY; close() returns it to the pool."""
    return engine.raw_connection()


def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the schema to `revision` with Alembic (idempotent; safe to call at every start)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # Serialise concurrent starts (two services migrating at once) on an advisory lock.
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT pg_advisory_lock(724201)"))
            try:
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
                connection.commit()
            finally:
                connection.execute(sa.text("SELECT pg_advisory_unlock(724201)"))
                connection.commit()
    finally:
        engine.dispose()
