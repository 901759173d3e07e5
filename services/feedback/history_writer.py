"""Canary decisions into the consistency service's history (`consistency_history`, kind
'canary'; migration 0009 admits the kind), so `ConsistencyService.History` lists them beside
checks, repairs and rollbacks. For the consistency helper: this is the one writer of that kind."""
from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy.engine import Engine

CANARY_KIND = "canary"


def record_canary_decision(engine: Engine, instance: str, summary: str, detail: dict) -> None:
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO consistency_history (kind, instance, consistent, summary, detail) "
            "VALUES (:k, :i, NULL, :s, CAST(:d AS jsonb))"),
            {"k": CANARY_KIND, "i": instance, "s": summary, "d": json.dumps(detail, default=str)})
