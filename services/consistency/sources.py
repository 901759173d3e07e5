"""What each side holds, read from Postgres as bucket digests (services/contracts/digest.py)
and, for differing buckets only, as rows. The digests are computed inside Postgres (one
aggregate per side), so a check of a million items moves a few thousand bucket digests.

Sides and what their leaves hold:
* catalog (`items`, active): (item_id, content hash of the embedding text) — the hash is the
  features service's, computed in SQL by deltarec_content_hash;
* feature store items (`item_features`, active, listed, with an embedding): (item_id,
  content_hash) against the catalog, (item_id, md5 of the embedding bytes) against rankers;
* events per user: counts by type and the history size they imply, against `user_features`;
  counts of item events by type against the trainer's `trainer_interactions`.
Row reads also return a change token (a row's xmin, a user's newest event id) so that a second
read can tell a row that changed meanwhile (in flight) from one that stayed wrong (drift).
"""
from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.contracts import digest as dg

ITEM_TYPES = ("view", "click", "add_to_cart", "purchase")
EVENT_KINDS = ITEM_TYPES + ("search",)

_CATALOG_HASH = "deltarec_content_hash(title, description, category, brand)"
_FS_ACTIVE = "active AND in_catalog AND embedding IS NOT NULL"


@dataclass(frozen=True)
class Row:
    value: tuple
    token: str = ""       # changes whenever the row changes
    lsn: int = 0          # the side's LSN for the row, when it has one


def _counts(prefix: str = "") -> str:
    return ", ".join(f"count(*) FILTER (WHERE {prefix}event_type = '{kind}') AS n_{kind}" for kind in EVENT_KINDS)


def _item_counts(prefix: str = "") -> str:
    return ", ".join(f"count(*) FILTER (WHERE {prefix}event_type = '{kind}') AS n_{kind}" for kind in ITEM_TYPES)


class Sources:
    def __init__(self, engine: Engine, *, history_length: int = 50) -> None:
        self.engine = engine
        self.history_length = history_length

    # ------------------------------------------------------------------ positions
    def wal_lsn(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(sa.text("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")).scalar())

    def applied_lsn(self, consumer: str) -> int:
        with self.engine.connect() as connection:
            value = connection.execute(sa.text(
                "SELECT applied_lsn FROM consumer_offsets WHERE consumer = :c"), {"c": consumer}).scalar()
        return int(value or 0)

    # ------------------------------------------------------------------ generic
    def _aggregate(self, kind: str, sql_rows: str, key: str, fields: tuple[str, ...],
                   params: dict | None = None) -> dg.Digest:
        sql = (f"SELECT {dg.sql_bucket(key)} AS b, count(*), bit_xor({dg.sql_leaf(key, *fields)}) "
               f"FROM ({sql_rows}) AS side GROUP BY 1")
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text(sql), params or {}).all()
        return dg.Digest.of_aggregates(kind, rows)

    def _rows(self, sql: str, buckets: list[int], width: int, params: dict | None = None) -> dict[str, Row]:
        if not buckets:
            return {}
        with self.engine.connect() as connection:
            result = connection.execute(sa.text(sql), {"buckets": list(buckets), **(params or {})}).all()
        return {row[0]: Row(tuple(row[1:1 + width]), str(row[1 + width] if len(row) > 1 + width else ""),
                            int(row[2 + width]) if len(row) > 2 + width else 0) for row in result}

    # ------------------------------------------------------------------ catalog vs feature store
    def catalog_digest(self) -> dg.Digest:
        return self._aggregate(dg.CATALOG_ITEMS, f"SELECT item_id, {_CATALOG_HASH} AS h FROM items WHERE active",
                               "item_id", ("h",))

    def feature_items_digest(self) -> dg.Digest:
        return self._aggregate(dg.CATALOG_ITEMS, f"SELECT item_id, content_hash AS h FROM item_features "
                               f"WHERE {_FS_ACTIVE}", "item_id", ("h",))

    def catalog_rows(self, buckets: list[int]) -> dict[str, Row]:
        return self._rows(f"SELECT item_id, {_CATALOG_HASH}, xmin::text FROM items "
                          f"WHERE active AND {dg.sql_bucket('item_id')} = ANY(:buckets)", buckets, 1)

    def catalog_rows_of(self, item_ids: list[str]) -> dict[str, Row]:
        """Every listed id's catalog row, active or not (a second read of a few rows)."""
        with self.engine.connect() as connection:
            result = connection.execute(sa.text(
                f"SELECT item_id, {_CATALOG_HASH}, xmin::text, active FROM items WHERE item_id = ANY(:ids)"),
                {"ids": list(item_ids)}).all()
        return {row[0]: Row((row[1],) if row[3] else ("inactive",), row[2]) for row in result}

    def feature_item_rows(self, buckets: list[int]) -> dict[str, Row]:
        return self._rows(f"SELECT item_id, content_hash, xmin::text, updated_lsn FROM item_features "
                          f"WHERE {_FS_ACTIVE} AND {dg.sql_bucket('item_id')} = ANY(:buckets)", buckets, 1)

    def feature_item_rows_of(self, item_ids: list[str]) -> dict[str, Row]:
        with self.engine.connect() as connection:
            result = connection.execute(sa.text(
                f"SELECT item_id, content_hash, xmin::text, updated_lsn, ({_FS_ACTIVE}) AS listed "
                "FROM item_features WHERE item_id = ANY(:ids)"), {"ids": list(item_ids)}).all()
        return {row[0]: Row((row[1],) if row[4] else ("inactive",), row[2], int(row[3])) for row in result}

    # ------------------------------------------------------------------ feature store vs index
    def index_expected_digest(self, upper_lsn: int | None = None) -> dg.Digest:
        where = _FS_ACTIVE + ("" if upper_lsn is None else " AND updated_lsn <= :upper")
        return self._aggregate(dg.INDEX_ITEMS, f"SELECT item_id, md5(embedding) AS f FROM item_features "
                               f"WHERE {where}", "item_id", ("f",), {"upper": upper_lsn})

    def index_expected_rows(self, buckets: list[int]) -> dict[str, Row]:
        """Every row of the buckets, listed or not: value ("<fingerprint>",) or ("absent",), and
        the row's updated_lsn (a ranker at watermark W is expected to reflect it iff <= W)."""
        return self._rows(f"SELECT item_id, CASE WHEN {_FS_ACTIVE} THEN md5(embedding) ELSE 'absent' END, "
                          f"xmin::text, updated_lsn FROM item_features "
                          f"WHERE {dg.sql_bucket('item_id')} = ANY(:buckets)", buckets, 1)

    # ------------------------------------------------------------------ events vs user state
    def _event_users_sql(self, where: str = "") -> str:
        return (f"SELECT user_id, {_counts()}, least(:hist, count(*) FILTER (WHERE event_type <> 'search' "
                f"AND item_id IS NOT NULL)) AS hist, max(id)::text AS token FROM events {where} GROUP BY user_id")

    def _user_state_sql(self, where: str = "") -> str:
        counters = ", ".join(f"coalesce((counters->>'{kind}')::bigint, 0) AS n_{kind}" for kind in EVENT_KINDS)
        return (f"SELECT user_id, {counters}, jsonb_array_length(history) AS hist, xmin::text AS token, "
                f"updated_lsn FROM user_features {where}")

    def _user_fields(self) -> tuple[str, ...]:
        return tuple(f"n_{kind}" for kind in EVENT_KINDS) + ("hist",)

    def event_users_digest(self) -> dg.Digest:
        return self._aggregate(dg.USER_EVENTS, self._event_users_sql(), "user_id", self._user_fields(),
                               {"hist": self.history_length})

    def user_state_digest(self) -> dg.Digest:
        return self._aggregate(dg.USER_EVENTS, self._user_state_sql(), "user_id", self._user_fields())

    def event_user_rows(self, buckets: list[int] | None = None, user_ids: list[str] | None = None) -> dict[str, Row]:
        where = (f"WHERE {dg.sql_bucket('user_id')} = ANY(:buckets)" if user_ids is None
                 else "WHERE user_id = ANY(:ids)")
        return self._rows(self._event_users_sql(where), buckets or [0], len(EVENT_KINDS) + 1,
                          {"hist": self.history_length, "ids": user_ids or []})

    def user_state_rows(self, buckets: list[int] | None = None, user_ids: list[str] | None = None) -> dict[str, Row]:
        where = (f"WHERE {dg.sql_bucket('user_id')} = ANY(:buckets)" if user_ids is None
                 else "WHERE user_id = ANY(:ids)")
        return self._rows(self._user_state_sql(where), buckets or [0], len(EVENT_KINDS) + 1,
                          {"ids": user_ids or []})

    # ------------------------------------------------------------------ events vs trainer log
    def _trainer_events_sql(self, where: str = "") -> str:
        extra = f" AND {where}" if where else ""
        return (f"SELECT user_id, {_item_counts()}, max(id)::text AS token FROM events "
                f"WHERE item_id IS NOT NULL AND event_type <> 'search'{extra} GROUP BY user_id")

    def _trainer_log_sql(self, where: str = "") -> str:
        extra = f"WHERE {where}" if where else ""
        return (f"SELECT user_id, {_item_counts()}, count(*)::text AS token, max(commit_lsn) AS lsn "
                f"FROM trainer_interactions {extra} GROUP BY user_id")

    def _trainer_fields(self) -> tuple[str, ...]:
        return tuple(f"n_{kind}" for kind in ITEM_TYPES)

    def trainer_tables_exist(self) -> bool:
        with self.engine.connect() as connection:
            return bool(connection.execute(sa.text("SELECT to_regclass('trainer_interactions') IS NOT NULL "
                                                   "AND EXISTS (SELECT 1 FROM consumer_offsets WHERE consumer = "
                                                   "'trainer')")).scalar())

    def event_trainer_digest(self) -> dg.Digest:
        return self._aggregate("trainer_events", self._trainer_events_sql(), "user_id", self._trainer_fields())

    def trainer_log_digest(self) -> dg.Digest:
        return self._aggregate("trainer_events", self._trainer_log_sql(), "user_id", self._trainer_fields())

    def event_trainer_rows(self, buckets: list[int] | None = None, user_ids: list[str] | None = None) -> dict[str, Row]:
        where = (f"{dg.sql_bucket('user_id')} = ANY(:buckets)" if user_ids is None else "user_id = ANY(:ids)")
        return self._rows(self._trainer_events_sql(where), buckets or [0], len(ITEM_TYPES), {"ids": user_ids or []})

    def trainer_log_rows(self, buckets: list[int] | None = None, user_ids: list[str] | None = None) -> dict[str, Row]:
        where = (f"{dg.sql_bucket('user_id')} = ANY(:buckets)" if user_ids is None else "user_id = ANY(:ids)")
        return self._rows(self._trainer_log_sql(where), buckets or [0], len(ITEM_TYPES), {"ids": user_ids or []})

    # ------------------------------------------------------------------ replication
    def slots(self) -> list[dict]:
        with self.engine.connect() as connection:
            has_groups = connection.execute(sa.text("SELECT to_regclass('cdc_consumer_groups') IS NOT NULL")).scalar()
            group_join = ("LEFT JOIN cdc_consumer_groups g ON g.slot_name = s.slot_name" if has_groups
                          else "LEFT JOIN (SELECT NULL::text AS name, NULL::text AS slot_name) g ON false")
            rows = connection.execute(sa.text(
                "SELECT s.slot_name, g.name AS group_name, s.active, "
                "COALESCE(s.restart_lsn - '0/0'::pg_lsn, 0) AS restart_lsn, "
                "COALESCE(s.confirmed_flush_lsn - '0/0'::pg_lsn, 0) AS confirmed_lsn, "
                "pg_current_wal_lsn() - '0/0'::pg_lsn AS wal_lsn, s.wal_status "
                f"FROM pg_replication_slots s {group_join} "
                "WHERE s.database = current_database() ORDER BY s.slot_name")).mappings().all()
        return [dict(row) for row in rows]
