"""Postgres side of the feature store: `item_features`, `user_features`, `consumer_offsets`.

Writes happen inside a transaction the applier opens (one per delta batch), so the features and
the high-water mark commit together. Bulk writes are one `INSERT ... SELECT FROM unnest(...)`
statement per table. Reads that return a watermark read it in the same statement as the data
(one statement = one snapshot), so `data_lsn` never claims more than the data shows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from services.contracts.item_text import ItemText
from services.features.deltas import Progress
from services.features.item_stats import ItemStats
from services.features.items import ItemRecord
from services.features.user_state import HistoryEntry, QueryEntry, UserState

ITEM_COLUMNS = ("item_id, in_catalog, active, content_hash, embedding, embedding_model, fallback_embedding, "
                "title, category, brand, price, currency, views, clicks, add_to_carts, purchases, "
                "popularity, popularity_at, last_interaction, stats_lsn, updated_lsn")

SAVE_ITEMS_SQL = f"""
INSERT INTO item_features ({ITEM_COLUMNS})
SELECT * FROM unnest(%(item_id)s::text[], %(in_catalog)s::boolean[], %(active)s::boolean[],
                     %(content_hash)s::text[], %(embedding)s::bytea[], %(embedding_model)s::text[],
                     %(fallback_embedding)s::boolean[], %(title)s::text[], %(category)s::text[],
                     %(brand)s::text[], %(price)s::numeric[], %(currency)s::text[], %(views)s::bigint[],
                     %(clicks)s::bigint[], %(add_to_carts)s::bigint[], %(purchases)s::bigint[],
                     %(popularity)s::float8[], %(popularity_at)s::timestamptz[],
                     %(last_interaction)s::timestamptz[], %(stats_lsn)s::bigint[], %(updated_lsn)s::bigint[])
ON CONFLICT (item_id) DO UPDATE SET
    in_catalog = EXCLUDED.in_catalog, active = EXCLUDED.active, content_hash = EXCLUDED.content_hash,
    embedding = EXCLUDED.embedding, embedding_model = EXCLUDED.embedding_model,
    fallback_embedding = EXCLUDED.fallback_embedding, title = EXCLUDED.title,
    category = EXCLUDED.category, brand = EXCLUDED.brand, price = EXCLUDED.price,
    currency = EXCLUDED.currency, views = EXCLUDED.views, clicks = EXCLUDED.clicks,
    add_to_carts = EXCLUDED.add_to_carts, purchases = EXCLUDED.purchases,
    popularity = EXCLUDED.popularity, popularity_at = EXCLUDED.popularity_at,
    last_interaction = EXCLUDED.last_interaction, stats_lsn = EXCLUDED.stats_lsn,
    updated_lsn = EXCLUDED.updated_lsn
"""

SAVE_USERS_SQL = """
INSERT INTO user_features (user_id, history, counters, recent_queries, updated_lsn, seen_items, seen_truncated)
SELECT * FROM unnest(%(user_id)s::text[], %(history)s::jsonb[], %(counters)s::jsonb[],
                     %(recent_queries)s::jsonb[], %(updated_lsn)s::bigint[], %(seen_items)s::jsonb[],
                     %(seen_truncated)s::boolean[])
ON CONFLICT (user_id) DO UPDATE SET
    history = EXCLUDED.history, counters = EXCLUDED.counters,
    recent_queries = EXCLUDED.recent_queries, updated_lsn = EXCLUDED.updated_lsn,
    seen_items = EXCLUDED.seen_items, seen_truncated = EXCLUDED.seen_truncated
"""

USER_COLUMNS = "user_id, history, counters, recent_queries, updated_lsn, seen_items, seen_truncated"


@dataclass(frozen=True)
class CatalogEntry:
    item_id: str
    text: ItemText
    price: object
    currency: str | None
    active: bool


def _item_from_row(row) -> ItemRecord:
    stats = ItemStats(views=row.views, clicks=row.clicks, add_to_carts=row.add_to_carts,
                      purchases=row.purchases, popularity=row.popularity, popularity_at=row.popularity_at,
                      last_interaction=row.last_interaction, updated_lsn=row.stats_lsn)
    return ItemRecord(item_id=row.item_id, in_catalog=row.in_catalog, active=row.active,
                      content_hash=row.content_hash,
                      embedding=bytes(row.embedding) if row.embedding is not None else None,
                      embedding_model=row.embedding_model, fallback_embedding=row.fallback_embedding,
                      title=row.title, category=row.category, brand=row.brand, price=row.price,
                      currency=row.currency.strip() if row.currency else None, stats=stats,
                      updated_lsn=row.updated_lsn)


def _user_from_row(row) -> UserState:
    return UserState(user_id=row.user_id,
                     history=[HistoryEntry.from_json(entry) for entry in row.history or []],
                     counters={name: int(count) for name, count in (row.counters or {}).items()},
                     recent_queries=[QueryEntry.from_json(entry) for entry in row.recent_queries or []],
                     updated_lsn=row.updated_lsn, seen=UserState.seen_from_json(row.seen_items),
                     seen_truncated=bool(row.seen_truncated))


class FeatureStore:
    def __init__(self, engine: Engine, consumer: str) -> None:
        self.engine = engine
        self.consumer = consumer

    # ------------------------------------------------------------------ progress
    def lock_progress(self, connection: Connection) -> Progress:
        """The stored progress, row-locked until the transaction ends: applying a batch and a
        Resync serialise here (and so would two replicas pointed at one group)."""
        connection.execute(sa.text(
            "INSERT INTO consumer_offsets (consumer) VALUES (:c) ON CONFLICT (consumer) DO NOTHING"),
            {"c": self.consumer})
        row = connection.execute(sa.text(
            "SELECT applied_lsn, last_xid, snapshot_lsn, snapshot_done, stream_lsn FROM consumer_offsets "
            "WHERE consumer = :c FOR UPDATE"), {"c": self.consumer}).one()
        return Progress(row.applied_lsn, row.last_xid, row.snapshot_lsn, row.snapshot_done, row.stream_lsn)

    def read_progress(self) -> Progress:
        with self.engine.connect() as connection:
            row = connection.execute(sa.text(
                "SELECT applied_lsn, last_xid, snapshot_lsn, snapshot_done, stream_lsn FROM consumer_offsets "
                "WHERE consumer = :c"), {"c": self.consumer}).one_or_none()
        return Progress() if row is None else Progress(row.applied_lsn, row.last_xid, row.snapshot_lsn,
                                                       row.snapshot_done, row.stream_lsn)

    def save_progress(self, connection: Connection, progress: Progress) -> None:
        connection.execute(sa.text(
            "UPDATE consumer_offsets SET applied_lsn = :lsn, last_xid = :xid, snapshot_lsn = :snap, "
            "snapshot_done = :done, stream_lsn = :stream, updated_at = now() WHERE consumer = :c"),
            {"lsn": progress.applied_lsn, "xid": progress.last_xid, "snap": progress.snapshot_lsn,
             "done": progress.snapshot_done, "stream": progress.stream_lsn, "c": self.consumer})

    # ------------------------------------------------------------------ items
    def load_items(self, connection: Connection, item_ids: Iterable[str], *,
                   lock: bool) -> dict[str, ItemRecord]:
        ids = sorted(set(item_ids))   # sorted: rows are locked in one order by every writer
        if not ids:
            return {}
        rows = connection.execute(sa.text(
            f"SELECT {ITEM_COLUMNS} FROM item_features WHERE item_id = ANY(:ids) ORDER BY item_id"
            + (" FOR UPDATE" if lock else "")), {"ids": ids})
        return {row.item_id: _item_from_row(row) for row in rows}

    def save_items(self, connection: Connection, records: Iterable[ItemRecord]) -> int:
        records = list(records)
        if not records:
            return 0
        params = {
            "item_id": [r.item_id for r in records], "in_catalog": [r.in_catalog for r in records],
            "active": [r.active for r in records], "content_hash": [r.content_hash for r in records],
            "embedding": [r.embedding for r in records],
            "embedding_model": [r.embedding_model for r in records],
            "fallback_embedding": [r.fallback_embedding for r in records],
            "title": [r.title for r in records], "category": [r.category for r in records],
            "brand": [r.brand for r in records], "price": [r.price for r in records],
            "currency": [r.currency for r in records], "views": [r.stats.views for r in records],
            "clicks": [r.stats.clicks for r in records],
            "add_to_carts": [r.stats.add_to_carts for r in records],
            "purchases": [r.stats.purchases for r in records],
            "popularity": [r.stats.popularity for r in records],
            "popularity_at": [r.stats.popularity_at for r in records],
            "last_interaction": [r.stats.last_interaction for r in records],
            "stats_lsn": [r.stats.updated_lsn for r in records],
            "updated_lsn": [r.updated_lsn for r in records],
        }
        connection.exec_driver_sql(SAVE_ITEMS_SQL, params)
        return len(records)

    def remove_all_items(self, connection: Connection, lsn: int) -> int:
        """TRUNCATE of the catalog: every listed item becomes a tombstone at `lsn`."""
        return connection.execute(sa.text(
            "UPDATE item_features SET in_catalog = false, active = false, updated_lsn = :lsn "
            "WHERE in_catalog"), {"lsn": lsn}).rowcount

    def item_ids_in_catalog(self, connection: Connection) -> list[str]:
        return list(connection.execute(sa.text(
            "SELECT item_id FROM item_features WHERE in_catalog ORDER BY item_id")).scalars())

    # ------------------------------------------------------------------ users
    def load_users(self, connection: Connection, user_ids: Iterable[str], *,
                   lock: bool) -> dict[str, UserState]:
        ids = sorted(set(user_ids))
        if not ids:
            return {}
        rows = connection.execute(sa.text(
            f"SELECT {USER_COLUMNS} FROM user_features "
            "WHERE user_id = ANY(:ids) ORDER BY user_id" + (" FOR UPDATE" if lock else "")), {"ids": ids})
        return {row.user_id: _user_from_row(row) for row in rows}

    def save_users(self, connection: Connection, users: Iterable[UserState]) -> int:
        users = list(users)
        if not users:
            return 0
        params = {
            "user_id": [u.user_id for u in users],
            "history": [json.dumps([entry.to_json() for entry in u.history]) for u in users],
            "counters": [json.dumps(u.counters, sort_keys=True) for u in users],
            "recent_queries": [json.dumps([entry.to_json() for entry in u.recent_queries]) for u in users],
            "updated_lsn": [u.updated_lsn for u in users],
            "seen_items": [json.dumps(u.seen_to_json()) for u in users],
            "seen_truncated": [u.seen_truncated for u in users],
        }
        connection.exec_driver_sql(SAVE_USERS_SQL, params)
        return len(users)

    def rebuilt_snapshots(self, connection: Connection, user_ids: Iterable[str]) -> dict[str, str]:
        """Users whose state was rebuilt by RebuildUsers: the snapshot it was rebuilt from."""
        ids = sorted(set(user_ids))
        if not ids:
            return {}
        return dict(connection.execute(sa.text(
            "SELECT user_id, rebuilt_snapshot FROM user_features "
            "WHERE user_id = ANY(:ids) AND rebuilt_snapshot IS NOT NULL"), {"ids": ids}).all())

    def mark_rebuilt(self, connection: Connection, user_ids: list[str], snapshot: str) -> None:
        connection.execute(sa.text(
            "UPDATE user_features SET rebuilt_snapshot = :s WHERE user_id = ANY(:ids)"),
            {"s": snapshot, "ids": user_ids})

    def delete_users(self, connection: Connection, user_ids: list[str]) -> int:
        return connection.execute(sa.text("DELETE FROM user_features WHERE user_id = ANY(:ids)"),
                                  {"ids": user_ids}).rowcount

    def start_rebuild(self, connection: Connection) -> None:
        """Before a snapshot that starts over: forgets everything derived from events, and marks
        every listed item unconfirmed (out of the catalog, still active, vector kept) — the
        snapshot confirms the items that still exist (their vectors are reused when their text
        did not change) and `finish_rebuild` removes the others."""
        connection.execute(sa.text("DELETE FROM user_features"))
        connection.execute(sa.text("DELETE FROM item_features WHERE updated_lsn = 0 AND NOT in_catalog"))
        connection.execute(sa.text(
            "UPDATE item_features SET views = 0, clicks = 0, add_to_carts = 0, purchases = 0, "
            "popularity = 0, popularity_at = NULL, last_interaction = NULL, stats_lsn = 0, "
            "in_catalog = false"))

    def finish_snapshot(self, connection: Connection, lsn: int) -> int:
        """At the end of a snapshot: items left unconfirmed by it are gone from the catalog."""
        return connection.execute(sa.text(
            "UPDATE item_features SET active = false, updated_lsn = :lsn WHERE NOT in_catalog AND active"),
            {"lsn": lsn}).rowcount

    # ------------------------------------------------------------------ the catalog (source)
    def catalog_entries(self, connection: Connection,
                        item_ids: Iterable[str] | None) -> dict[str, CatalogEntry]:
        """Current catalog rows (the `items` table) for Resync and for text columns the stream
        left out (unchanged TOASTed values). None = every item."""
        sql = "SELECT item_id, title, description, category, brand, price, currency, active FROM items"
        params = {}
        if item_ids is not None:
            sql += " WHERE item_id = ANY(:ids)"
            params["ids"] = sorted(set(item_ids))
        rows = connection.execute(sa.text(sql + " ORDER BY item_id"), params)
        return {row.item_id: CatalogEntry(row.item_id, ItemText(row.title, row.description, row.category,
                                                                 row.brand),
                                          row.price, row.currency.strip() if row.currency else None,
                                          row.active)
                for row in rows}

    # ------------------------------------------------------------------ reads for the API
    def read_user(self, user_id: str) -> tuple[UserState | None, int]:
        with self.engine.connect() as connection:
            row = connection.execute(sa.text(
                "SELECT coalesce((SELECT applied_lsn FROM consumer_offsets WHERE consumer = :c), 0) "
                "AS data_lsn, u.user_id, u.history, u.counters, u.recent_queries, u.updated_lsn, "
                "u.seen_items, u.seen_truncated "
                "FROM (SELECT 1) AS one LEFT JOIN user_features u ON u.user_id = :u"),
                {"c": self.consumer, "u": user_id}).one()
        return (None if row.user_id is None else _user_from_row(row)), row.data_lsn

    def read_users(self, user_ids: list[str]) -> tuple[dict[str, UserState], int]:
        """Several users and the watermark, in one statement (one snapshot: every state is
        exact as of that watermark)."""
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text(
                "SELECT coalesce((SELECT applied_lsn FROM consumer_offsets WHERE consumer = :c), 0) "
                f"AS data_lsn, u.* FROM (SELECT 1) AS one LEFT JOIN "
                f"(SELECT {USER_COLUMNS} FROM user_features WHERE user_id = ANY(:ids)) u ON true"),
                {"c": self.consumer, "ids": list(set(user_ids))}).all()
        data_lsn = rows[0].data_lsn if rows else 0
        return {row.user_id: _user_from_row(row) for row in rows if row.user_id is not None}, data_lsn

    def read_user_changes(self, after: tuple[int, str | None], limit: int) -> tuple[list[tuple[str, int]], int]:
        """(user id, updated_lsn) of users changed after `after` = (lsn, user_id), in
        (updated_lsn, user_id) order (keyset pages on user_features_updated_lsn_idx; a None user
        id starts after every user of that LSN), with the applied watermark of the SAME snapshot
        (one statement): every user changed at or below it has its row in the snapshot at an LSN
        between that change and it, so no row can have moved past the page unseen."""
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text(
                "SELECT coalesce((SELECT applied_lsn FROM consumer_offsets WHERE consumer = :c), 0) "
                "AS applied, u.user_id, u.updated_lsn FROM (SELECT 1) AS one LEFT JOIN "
                "(SELECT user_id, updated_lsn FROM user_features "
                " WHERE (updated_lsn, user_id) > (:lsn, :user) ORDER BY updated_lsn, user_id LIMIT :limit) u "
                "ON true ORDER BY u.updated_lsn, u.user_id"),
                {"c": self.consumer, "lsn": after[0], "user": after[1], "limit": limit}).all()
        applied = int(rows[0].applied) if rows else 0
        return [(row.user_id, row.updated_lsn) for row in rows if row.user_id is not None], applied

    def read_items(self, item_ids: list[str]) -> tuple[dict[str, ItemRecord], int]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text(
                f"SELECT coalesce((SELECT applied_lsn FROM consumer_offsets WHERE consumer = :c), 0) "
                f"AS data_lsn, f.* FROM (SELECT 1) AS one LEFT JOIN "
                f"(SELECT {ITEM_COLUMNS} FROM item_features WHERE item_id = ANY(:ids) AND in_catalog) f "
                f"ON true"), {"c": self.consumer, "ids": list(set(item_ids))}).all()
        data_lsn = rows[0].data_lsn if rows else 0
        return {row.item_id: _item_from_row(row) for row in rows if row.item_id is not None}, data_lsn

    def read_changes(self, after: tuple[int, str | None], limit: int) -> tuple[list[ItemRecord], int]:
        """Items whose catalog data or vector changed after `after` = (lsn, item_id), in
        (updated_lsn, item_id) order, with the applied watermark of the SAME snapshot (one
        statement: an item changed at or below it has its row there at an LSN between that change
        and it). Keyset pagination, each page its own short statement, so a slow watcher never
        holds a snapshot open."""
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text(
                f"SELECT coalesce((SELECT applied_lsn FROM consumer_offsets WHERE consumer = :c), 0) "
                f"AS data_lsn, f.* FROM (SELECT 1) AS one LEFT JOIN "
                f"(SELECT {ITEM_COLUMNS} FROM item_features WHERE (updated_lsn, item_id) > (:lsn, :item) "
                f" ORDER BY updated_lsn, item_id LIMIT :limit) f "
                f"ON true ORDER BY f.updated_lsn, f.item_id"),
                {"c": self.consumer, "lsn": after[0], "item": after[1], "limit": limit}).all()
        applied = int(rows[0].data_lsn) if rows else 0
        return [_item_from_row(row) for row in rows if row.item_id is not None], applied

    def current_wal_lsn(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(sa.text(
                "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")).scalar())

    def applied_lsn(self) -> int:
        with self.engine.connect() as connection:
            value = connection.execute(sa.text(
                "SELECT applied_lsn FROM consumer_offsets WHERE consumer = :c"),
                {"c": self.consumer}).scalar()
        return int(value or 0)

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as connection:
            row = connection.execute(sa.text(
                "SELECT count(*) FILTER (WHERE in_catalog) AS items, "
                "count(*) FILTER (WHERE in_catalog AND active) AS active_items, "
                "(SELECT count(*) FROM user_features) AS users FROM item_features")).one()
        return {"items": row.items, "active_items": row.active_items, "users": row.users}

    def latest_event_time(self) -> datetime | None:
        with self.engine.connect() as connection:
            return connection.execute(sa.text("SELECT max(popularity_at) FROM item_features")).scalar()
