"""Postgres side of the collector: one round trip per batch.

Events go in with one `INSERT ... SELECT FROM unnest(...) ON CONFLICT (event_id)
DO NOTHING RETURNING`, which is also where idempotency lives: the unique index on
`event_id` makes concurrent duplicate batches safe, and RETURNING tells which
events this call stored. Rejections are written by the same statement (a
data-modifying CTE), so the whole batch is one transaction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.collector.validation import ItemRow
from services.contracts.event_row import EventRow

INGEST_SQL = """
WITH input AS (
    SELECT * FROM unnest(%(event_ids)s::text[], %(types)s::text[], %(users)s::text[],
                         %(items)s::text[], %(queries)s::text[], %(times)s::timestamptz[],
                         %(attributes)s::jsonb[])
        AS t(event_id, event_type, user_id, item_id, query, occurred_at, attributes)
), rejected AS (
    INSERT INTO rejected_events (event_id, payload, reason)
    SELECT * FROM unnest(%(rejected_ids)s::text[], %(rejected_payloads)s::jsonb[],
                         %(rejected_reasons)s::text[])
    RETURNING 1
), inserted AS (
    INSERT INTO events (event_id, event_type, user_id, item_id, query, occurred_at, attributes)
    SELECT event_id, event_type, user_id, item_id, query, occurred_at, attributes FROM input
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id, item_id
)
SELECT i.event_id,
       i.item_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM items WHERE items.item_id = i.item_id)
FROM inserted i
"""

UPSERT_ITEMS_SQL = """
INSERT INTO items (item_id, title, description, category, brand, price, currency, attributes,
                   active, updated_at)
SELECT item_id, title, description, category, brand, price, currency, attributes, active, now()
FROM unnest(%(ids)s::text[], %(titles)s::text[], %(descriptions)s::text[], %(categories)s::text[],
            %(brands)s::text[], %(prices)s::numeric[], %(currencies)s::text[],
            %(attributes)s::jsonb[], %(actives)s::boolean[])
    AS t(item_id, title, description, category, brand, price, currency, attributes, active)
ON CONFLICT (item_id) DO UPDATE SET
    title = EXCLUDED.title, description = EXCLUDED.description, category = EXCLUDED.category,
    brand = EXCLUDED.brand, price = EXCLUDED.price, currency = EXCLUDED.currency,
    attributes = EXCLUDED.attributes, active = EXCLUDED.active, updated_at = now()
"""


def _array_literal(values: list[str | None]) -> str:
    """A Postgres array literal: every element double-quoted (backslash and quote escaped), None
    as NULL."""
    return "{" + ",".join(
        "NULL" if value is None else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        for value in values) + "}"


@dataclass(frozen=True)
class Rejection:
    event_id: str
    payload: str
    reason: str


@dataclass(frozen=True)
class IngestOutcome:
    stored: set[str]            # event ids this call stored
    unknown_items: int          # of those, how many name an item not in the catalog
    commit_lsn: int = 0         # WAL position once committed (0: nothing stored), see wal_position


# The WAL insert position read right after a commit, on the same connection: at or after the end
# of that commit record, which is the commit_lsn the delta stream reports for the transaction
# (the end LSN). A reader that waits until a consumer's watermark reaches it (min_data_lsn) so
# waits for this write: every transaction committed before the position has been applied once the
# watermark (a batch's commit_lsn, or a caught-up position) is at or beyond it. It is usually
# exactly that end LSN; WAL written in between by others (e.g. the feature store's own commits)
# makes it a little later, which the next batch or caught-up heartbeat covers.
WAL_POSITION_SQL = "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"


class CollectorStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def ingest(self, rows: list[EventRow], rejections: list[Rejection]) -> IngestOutcome:
        """Stores valid rows and records rejections, in one statement and one transaction.
        Returns only after the commit: what it calls stored is durable."""
        if not rows and not rejections:
            return IngestOutcome(set(), 0)
        # One global insertion order (by event_id): concurrent batches that overlap in different
        # orders would otherwise wait on each other's uncommitted ids and deadlock.
        rows = sorted(rows, key=lambda r: r.event_id)
        # Each array goes as one array literal: Postgres parses '{...}'::text[] about twice as
        # fast as the ARRAY[...] expression of one constant per element psycopg2 sends for a list.
        params = {
            "event_ids": _array_literal([r.event_id for r in rows]),
            "types": _array_literal([r.event_type for r in rows]),
            "users": _array_literal([r.user_id for r in rows]),
            "items": _array_literal([r.item_id for r in rows]),
            "queries": _array_literal([r.query for r in rows]),
            "times": _array_literal([r.occurred_at.isoformat() for r in rows]),
            "attributes": _array_literal([json.dumps(r.attributes) for r in rows]),
            "rejected_ids": _array_literal([r.event_id for r in rejections]),
            "rejected_payloads": _array_literal([r.payload for r in rejections]),
            "rejected_reasons": _array_literal([r.reason for r in rejections]),
        }
        connection = self.engine.raw_connection()
        driver = connection.dbapi_connection
        try:
            # One statement in autocommit mode is its own transaction, committed by Postgres before
            # execute() returns: one round trip instead of BEGIN, INSERT, COMMIT.
            driver.autocommit = True
            with driver.cursor() as cursor:
                cursor.execute(INGEST_SQL, params)
                result = cursor.fetchall()
                commit_lsn = 0
                if result:
                    cursor.execute(WAL_POSITION_SQL)
                    commit_lsn = int(cursor.fetchone()[0])
        finally:
            if not driver.closed:
                driver.autocommit = False
            connection.close()
        return IngestOutcome({event_id for event_id, _ in result}, sum(1 for _, unknown in result if unknown),
                             commit_lsn)

    def wal_position(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.exec_driver_sql(WAL_POSITION_SQL).scalar())

    def upsert_items(self, rows: list[ItemRow]) -> tuple[int, int]:
        """(rows written, WAL position after the commit)."""
        if not rows:
            return 0, 0
        params = {
            "ids": [r.item_id for r in rows], "titles": [r.title for r in rows],
            "descriptions": [r.description for r in rows], "categories": [r.category for r in rows],
            "brands": [r.brand for r in rows], "prices": [r.price for r in rows],
            "currencies": [r.currency for r in rows],
            "attributes": [json.dumps(r.attributes) for r in rows],
            "actives": [r.active for r in rows],
        }
        with self.engine.begin() as connection:
            connection.exec_driver_sql(UPSERT_ITEMS_SQL, params)
        return len(rows), self.wal_position()

    def delete_items(self, item_ids: list[str]) -> tuple[set[str], int]:
        """(ids deleted, WAL position after the commit; 0 when nothing was deleted)."""
        with self.engine.begin() as connection:
            deleted = connection.execute(
                sa.text("DELETE FROM items WHERE item_id = ANY(:ids) RETURNING item_id"),
                {"ids": list(item_ids)}).scalars().all()
        return set(deleted), (self.wal_position() if deleted else 0)
