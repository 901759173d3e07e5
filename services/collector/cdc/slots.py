"""Postgres side of change data capture: the publication, replication slots and the
consumer-group rows (table `cdc_consumer_groups`, migration 0002).

Slot names are cluster-wide while groups belong to one database, so a slot is named
`<prefix><group>` with the prefix defaulting to `deltarec_<database>_` (several databases on one
cluster, e.g. one per test module, never collide). Names are cut to Postgres' 63 characters
with a hash suffix when needed.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Sequence

import psycopg2
import psycopg2.extensions
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from services.collector.cdc import values
from services.common.lsn import parse_lsn

log = logging.getLogger(__name__)

MAX_IDENTIFIER = 63
GROUP_NAME = re.compile(r"[a-z][a-z0-9_]{0,40}")


def libpq_dsn(database_url: str, application_name: str = "deltarec-collector-cdc") -> str:
    """A libpq DSN for the database of a SQLAlchemy URL, with the CDC session settings."""
    url = make_url(database_url)
    params = {"host": url.host, "port": url.port, "user": url.username, "password": url.password,
              "dbname": url.database, "application_name": application_name,
              "options": values.libpq_options(), "connect_timeout": 5}
    params.update({key: value for key, value in url.query.items() if isinstance(value, str)})
    return psycopg2.extensions.make_dsn(**{k: v for k, v in params.items() if v is not None})


def _identifier(text: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", text.lower())


def default_slot_prefix(database_url: str) -> str:
    return f"deltarec_{_identifier(make_url(database_url).database or 'db')}_"


def slot_name_for(prefix: str, group: str) -> str:
    name = prefix + group
    if len(name) <= MAX_IDENTIFIER:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return name[:MAX_IDENTIFIER - 9] + "_" + digest


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def qualified_table(table: str) -> str:
    schema, _, name = table.rpartition(".")
    return f"{quote_ident(schema)}.{quote_ident(name)}" if schema else quote_ident(name)


@dataclass(frozen=True)
class GroupRow:
    name: str
    slot_name: str
    tables: tuple[str, ...]
    consistent_lsn: int
    snapshot_rows: int
    snapshot_done: bool


@dataclass(frozen=True)
class SlotInfo:
    slot_name: str
    database: str
    active: bool
    active_pid: int | None
    confirmed_flush_lsn: int
    restart_lsn: int
    retained_wal_bytes: int


@dataclass(frozen=True)
class TableShape:
    """A table's columns (name, type OID) and the columns of its replica identity (the key
    pgoutput flags), read from the catalog for the snapshot."""
    name: str
    columns: tuple[tuple[str, int], ...]
    key_columns: tuple[str, ...]


SLOT_SQL = """
SELECT slot_name, database, active, active_pid, confirmed_flush_lsn::text, restart_lsn::text,
       COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint
FROM pg_replication_slots WHERE slot_name = :slot
"""


class SlotStore:
    def __init__(self, engine: Engine, slot_prefix: str) -> None:
        self.engine = engine
        self.slot_prefix = slot_prefix

    def slot_name(self, group: str) -> str:
        return slot_name_for(self.slot_prefix, group)

    # ------------------------------------------------------------------ groups
    def group(self, name: str) -> GroupRow | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.text(
                "SELECT name, slot_name, tables, consistent_lsn, snapshot_rows, snapshot_done_at IS NOT NULL "
                "FROM cdc_consumer_groups WHERE name = :name"), {"name": name}).first()
        return None if row is None else GroupRow(row[0], row[1], tuple(row[2]), row[3], row[4], row[5])

    def groups(self) -> list[GroupRow]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text(
                "SELECT name, slot_name, tables, consistent_lsn, snapshot_rows, snapshot_done_at IS NOT NULL "
                "FROM cdc_consumer_groups ORDER BY name")).all()
        return [GroupRow(r[0], r[1], tuple(r[2]), r[3], r[4], r[5]) for r in rows]

    def save_group(self, row: GroupRow) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.text(
                "INSERT INTO cdc_consumer_groups (name, slot_name, tables, consistent_lsn, snapshot_rows) "
                "VALUES (:name, :slot, :tables, :lsn, :rows) "
                "ON CONFLICT (name) DO UPDATE SET slot_name = EXCLUDED.slot_name, tables = EXCLUDED.tables, "
                "consistent_lsn = EXCLUDED.consistent_lsn, snapshot_rows = EXCLUDED.snapshot_rows, "
                "snapshot_done_at = NULL, created_at = now()"),
                {"name": row.name, "slot": row.slot_name, "tables": list(row.tables),
                 "lsn": row.consistent_lsn, "rows": row.snapshot_rows})

    def mark_snapshot_done(self, name: str, consistent_lsn: int) -> bool:
        with self.engine.begin() as connection:
            result = connection.execute(sa.text(
                "UPDATE cdc_consumer_groups SET snapshot_done_at = now() "
                "WHERE name = :name AND consistent_lsn = :lsn AND snapshot_done_at IS NULL"),
                {"name": name, "lsn": consistent_lsn})
        return result.rowcount > 0

    def delete_group(self, name: str) -> bool:
        with self.engine.begin() as connection:
            result = connection.execute(sa.text("DELETE FROM cdc_consumer_groups WHERE name = :name"),
                                        {"name": name})
        return result.rowcount > 0

    # ------------------------------------------------------------------ slots
    def slot(self, slot_name: str) -> SlotInfo | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.text(SLOT_SQL), {"slot": slot_name}).first()
        if row is None:
            return None
        return SlotInfo(row[0], row[1], bool(row[2]), row[3], parse_lsn(row[4]), parse_lsn(row[5]), int(row[6]))

    def slots_with_prefix(self) -> list[SlotInfo]:
        with self.engine.connect() as connection:
            names = connection.execute(sa.text(
                "SELECT slot_name FROM pg_replication_slots WHERE database = current_database() "
                "AND starts_with(slot_name, :prefix)"), {"prefix": self.slot_prefix}).scalars().all()
        return [info for info in (self.slot(name) for name in names) if info is not None]

    def drop_slot(self, slot_name: str) -> bool:
        with self.engine.begin() as connection:
            result = connection.execute(sa.text(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = :slot"), {"slot": slot_name}).all()
        return bool(result)

    def terminate_slot_user(self, slot_name: str) -> int | None:
        """Ends the walsender attached to a slot (fencing a collector that lost its lease but is
        still streaming, e.g. behind a network partition). Returns its pid, if there was one."""
        with self.engine.begin() as connection:
            row = connection.execute(sa.text(
                "SELECT active_pid, pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE slot_name = :slot AND active_pid IS NOT NULL"), {"slot": slot_name}).first()
        return None if row is None else row[0]

    def current_wal_lsn(self) -> int:
        """The WAL insert position: at or after the end of every transaction committed so far
        (pg_current_wal_lsn(), the write position, can lag behind it with synchronous_commit
        off)."""
        with self.engine.connect() as connection:
            return parse_lsn(connection.execute(sa.text("SELECT pg_current_wal_insert_lsn()::text")).scalar())


def ensure_publication(engine: Engine, publication: str, tables: Sequence[str]) -> None:
    """Creates the publication if missing and adds missing tables to it (never removes any: a
    table taken out of a publication silently stops being captured for every group). Tables
    without a primary key get REPLICA IDENTITY FULL so that their deletes carry a key at all."""
    with engine.begin() as connection:
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(724202)"))
        for table in tables:
            regclass = connection.execute(sa.text("SELECT to_regclass(:t)::oid"), {"t": table}).scalar()
            if regclass is None:
                raise ValueError(f"COLLECTOR_CDC_TABLES: table {table!r} does not exist")
            identity, has_pk = connection.execute(sa.text(
                "SELECT relreplident, EXISTS (SELECT 1 FROM pg_index WHERE indrelid = c.oid AND indisprimary) "
                "FROM pg_class c WHERE c.oid = :oid"), {"oid": regclass}).one()
            if identity == "d" and not has_pk or identity == "n":
                log.warning("table has no usable replica identity; setting REPLICA IDENTITY FULL",
                            extra={"table": table})
                connection.execute(sa.text(f"ALTER TABLE {qualified_table(table)} REPLICA IDENTITY FULL"))
        exists = connection.execute(sa.text("SELECT 1 FROM pg_publication WHERE pubname = :p"),
                                    {"p": publication}).scalar()
        listed = ", ".join(qualified_table(t) for t in tables)
        if not exists:
            connection.execute(sa.text(f"CREATE PUBLICATION {quote_ident(publication)} FOR TABLE {listed}"))
            return
        present = set(connection.execute(sa.text(
            "SELECT CASE WHEN schemaname = 'public' THEN tablename ELSE schemaname || '.' || tablename END "
            "FROM pg_publication_tables WHERE pubname = :p"), {"p": publication}).scalars().all())
        missing = [t for t in tables if t not in present]
        if missing:
            connection.execute(sa.text(
                f"ALTER PUBLICATION {quote_ident(publication)} ADD TABLE "
                + ", ".join(qualified_table(t) for t in missing)))


def table_shape(cursor, table: str) -> TableShape:
    """Columns and replica-identity key of `table`, on a psycopg2 cursor (inside the snapshot
    transaction, so that the shape is the one the snapshot sees)."""
    cursor.execute("""
        SELECT a.attname, a.atttypid::int,
               CASE c.relreplident
                   WHEN 'f' THEN true
                   WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                                         AND i.indisreplident AND a.attnum = ANY(i.indkey))
                   WHEN 'd' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                                         AND i.indisprimary AND a.attnum = ANY(i.indkey))
                   ELSE false END
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attgenerated = ''
        ORDER BY a.attnum""", (table,))
    rows = cursor.fetchall()
    if not rows:
        raise ValueError(f"table {table!r} not found")
    return TableShape(table, tuple((name, oid) for name, oid, _ in rows),
                      tuple(name for name, _, key in rows if key))
