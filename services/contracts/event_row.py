"""One row of the `events` table: the shape the collector writes and every consumer of the delta
stream reads back.

The collector builds it from a validated `deltarec.v1.Event` (services/collector/validation.py)
and stores it; the features service and the trainer decode it from a delta's `new_row`
(`EventRow.from_delta_row`), where the CDC decoder hands every column over as text (`id` as a
number in text, `occurred_at` as Postgres prints a timestamptz).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from services.contracts.event_types import BY_NAME


class InvalidEventRow(ValueError):
    """A delta's `events` row that cannot be read (missing column, unknown type, bad timestamp)."""


@dataclass(frozen=True)
class EventRow:
    event_id: str
    event_type: str              # a name of services/contracts/event_types.py ("view", ...)
    user_id: str
    item_id: str | None          # None only for a search
    query: str | None            # set only for a search
    occurred_at: datetime        # timezone-aware
    attributes: dict[str, str] = field(default_factory=dict)   # not carried back from deltas: no consumer reads them
    row_id: int = 0              # events.id: 0 until Postgres assigned it

    @classmethod
    def from_delta_row(cls, row: dict) -> "EventRow":
        event_type = str(row.get("event_type") or "")
        if event_type not in BY_NAME:
            raise InvalidEventRow(f"unknown event_type {event_type!r}")
        for column in ("event_id", "user_id", "occurred_at"):
            if row.get(column) in (None, ""):
                raise InvalidEventRow(f"no {column} in the events row")
        raw_id = row.get("id")
        try:
            row_id = int(float(raw_id)) if raw_id not in (None, "") else 0
            occurred_at = parse_timestamp(row["occurred_at"])
        except (TypeError, ValueError) as error:
            raise InvalidEventRow(f"bad events row: {error}") from None
        return cls(event_id=str(row["event_id"]), event_type=event_type, user_id=str(row["user_id"]),
                   item_id=str(row["item_id"]) if row.get("item_id") else None,
                   query=str(row["query"]) if row.get("query") else None,
                   occurred_at=occurred_at, row_id=row_id)


def parse_timestamp(value: Any) -> datetime:
    """A timestamp as a delta carries it (Postgres text such as `2026-01-02 03:04:05.5+00`, ISO
    8601, a datetime, or seconds since the epoch); naive values are UTC."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, (int, float)):
        moment = datetime.fromtimestamp(float(value), timezone.utc)
    else:
        moment = datetime.fromisoformat(str(value).strip().replace(" ", "T", 1).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
