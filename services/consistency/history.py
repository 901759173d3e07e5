"""`consistency_history` (migration 0006): every check, repair and rollback, newest first."""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.feedback.history_writer import CANARY_KIND

# CANARY_KIND: the canary decider's decisions (services/feedback/history_writer.py writes them).
KINDS = ("check", "reconcile", "rollback", CANARY_KIND)


@dataclass(frozen=True)
class Entry:
    at: datetime
    kind: str
    summary: str
    consistent: bool | None
    detail: dict
    instance: str


class History:
    def __init__(self, engine: Engine, instance: str, keep: int = 10_000) -> None:
        self.engine, self.instance, self.keep = engine, instance, keep

    def record(self, kind: str, summary: str, detail: dict, consistent: bool | None = None) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.text(
                "INSERT INTO consistency_history (kind, instance, consistent, summary, detail) "
                "VALUES (:k, :i, :c, :s, CAST(:d AS jsonb))"),
                {"k": kind, "i": self.instance, "c": consistent, "s": summary,
                 "d": json.dumps(detail, default=str)})
            # Bounded: the oldest rows go once there are more than `keep` (cheap with the index).
            connection.execute(sa.text(
                "DELETE FROM consistency_history WHERE id < (SELECT id FROM consistency_history "
                "ORDER BY id DESC OFFSET :keep LIMIT 1)"), {"keep": self.keep})

    def entries(self, limit: int = 50, kind: str = "") -> list[Entry]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text(
                "SELECT at, kind, summary, consistent, detail, instance FROM consistency_history "
                "WHERE (:k = '' OR kind = :k) ORDER BY at DESC, id DESC LIMIT :n"),
                {"k": kind, "n": limit}).all()
        return [Entry(row.at, row.kind, row.summary, row.consistent,
                      row.detail if isinstance(row.detail, dict) else json.loads(row.detail or "{}"),
                      row.instance) for row in rows]
