"""From the collector's delta batches to plain changes, and which of them are new.

Decoding turns each `Delta` (table, operation, JSON-typed row) into an `ItemUpsert`,
`ItemRemoval`, `CatalogCleared` or `EventRow`. Selection decides, against the stored `Progress`,
which transactions of a batch have not been applied yet — the heart of exactly-once effects on
top of an at-least-once stream:

* The collector delivers whole transactions in commit order, and we store, in the same
  transaction as the features, the batch's `commit_lsn` (`applied_lsn`) and the xid of the last
  transaction applied (`last_xid`).
* A batch whose `commit_lsn` is at or below `applied_lsn` was applied before: skipped whole.
* After a crash between our commit and our ack, the collector resends from the last confirmed
  position and may group transactions differently, so a new batch can start with transactions we
  already applied. They are exactly the prefix up to and including the transaction `last_xid`
  (commit order is total), so that prefix is dropped. Comparing per-change LSNs instead would be
  wrong: changes of concurrent transactions interleave in the WAL, so a later-committed
  transaction can hold changes at LSNs below an earlier commit.
* Snapshot batches get strictly increasing positions ending at the slot's consistent point
  (every streamed transaction ends after it), so the same high-water mark covers them. A batch
  flagged `snapshot_begin` starts a snapshot: the collector starts a group's snapshot over (with
  a new slot) when a consumer never acked its end, so a begin means "rebuild": event-derived
  state is reset and the mark restarts at this snapshot — unless it is the very snapshot we
  already completed (same consistent point), which is skipped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterable, Union

from deltarec.v1 import collector_pb2

from services.contracts.event_row import EventRow, InvalidEventRow
from services.contracts.item_text import ItemText

log = logging.getLogger(__name__)

OP_INSERT, OP_UPDATE, OP_DELETE, OP_TRUNCATE, OP_SNAPSHOT = (
    collector_pb2.OPERATION_INSERT, collector_pb2.OPERATION_UPDATE, collector_pb2.OPERATION_DELETE,
    collector_pb2.OPERATION_TRUNCATE, collector_pb2.OPERATION_SNAPSHOT)
TEXT_COLUMNS = ("title", "description", "category", "brand")


@dataclass(frozen=True)
class ItemRow:
    """A catalog row as the stream carries it."""
    item_id: str
    text: ItemText
    price: Decimal | None
    currency: str | None
    active: bool
    # Text columns Postgres did not send (unchanged TOASTed values): their value must come from
    # elsewhere before the content hash can be computed.
    missing_text: tuple[str, ...] = ()


@dataclass(frozen=True)
class ItemUpsert:
    row: ItemRow


@dataclass(frozen=True)
class ItemRemoval:
    item_id: str


@dataclass(frozen=True)
class CatalogCleared:
    """TRUNCATE of the items table: every item leaves the active set."""


Change = Union[ItemUpsert, ItemRemoval, CatalogCleared, EventRow]


@dataclass
class Transaction:
    xid: int
    changes: list[Change] = field(default_factory=list)


@dataclass
class DecodedBatch:
    commit_lsn: int
    snapshot: bool
    transactions: list[Transaction]
    latest_commit_time: datetime | None = None
    ignored: int = 0          # deltas we have no use for (event updates, unknown tables)
    snapshot_begin: bool = False
    snapshot_end: bool = False
    # The slot's consistent point, for snapshot batches.
    snapshot_lsn: int = 0


@dataclass(frozen=True)
class Progress:
    """What the feature store has applied; stored with the features, in the same transaction."""
    # Everything up to here is applied; usually `stream_lsn`, a little above it after a Resync
    # (see FeatureApplier.resync).
    applied_lsn: int = 0
    last_xid: int = 0
    snapshot_lsn: int = 0
    snapshot_done: bool = False
    # End LSN of the last commit applied from the stream.
    stream_lsn: int = 0


@dataclass
class Selection:
    changes: list[Change]
    progress: Progress
    # True when a new snapshot starts over existing state: event-derived state must be rebuilt.
    restart_from_snapshot: bool = False
    skipped_transactions: int = 0

    @property
    def advances(self) -> bool:
        return bool(self.changes) or self.restart_from_snapshot


class BadDelta(ValueError):
    """A delta we cannot make sense of (missing key, malformed value)."""


# ----------------------------------------------------------------------------- decoding

def parse_decimal(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise BadDelta(f"not a number: {value!r}") from None


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in ("t", "true", "1", "yes")
    return bool(value)


def _key_value(key: dict | None, row: dict | None, column: str) -> str:
    for source in (key, row):
        if source and source.get(column) not in (None, ""):
            return str(source[column])
    raise BadDelta(f"no {column} in delta key or row")


def item_row(row: dict, missing: Iterable[str] = ()) -> ItemRow:
    currency = row.get("currency")
    return ItemRow(
        item_id=str(row["item_id"]),
        text=ItemText.from_row(row),
        price=parse_decimal(row.get("price")),
        currency=currency.strip() if isinstance(currency, str) and currency.strip() else None,
        active=_as_bool(row.get("active", True)),
        missing_text=tuple(column for column in TEXT_COLUMNS if column in set(missing)))


def event_row(row: dict) -> EventRow:
    try:
        return EventRow.from_delta_row(row)
    except InvalidEventRow as error:
        raise BadDelta(str(error)) from None


def decode_change(table: str, op: int, key: dict | None, new_row: dict | None, old_key: dict | None,
                  unchanged_toast: Iterable[str] = ()) -> list[Change]:
    """The changes one delta means to the feature store ([] when none)."""
    if table == "items":
        if op in (OP_INSERT, OP_SNAPSHOT):
            return [ItemUpsert(item_row(new_row or {}, unchanged_toast))]
        if op == OP_UPDATE:
            changes: list[Change] = []
            if old_key and old_key.get("item_id") not in (None, (new_row or {}).get("item_id")):
                changes.append(ItemRemoval(str(old_key["item_id"])))   # the key itself changed
            changes.append(ItemUpsert(item_row(new_row or {}, unchanged_toast)))
            return changes
        if op == OP_DELETE:
            return [ItemRemoval(_key_value(old_key, key, "item_id"))]
        if op == OP_TRUNCATE:
            return [CatalogCleared()]
    elif table == "events":
        if op in (OP_INSERT, OP_SNAPSHOT):
            return [event_row(new_row or {})]
        # The behaviour log is append-only: updates, deletes and truncations do not un-happen
        # the interactions already folded into the state.
    return []


def decode_batch(batch, row_of: Callable[[Any], dict]) -> DecodedBatch:
    """A deltarec.v1.DeltaBatch as plain changes, grouped by transaction (consecutive xid)."""
    transactions: list[Transaction] = []
    latest: datetime | None = None
    ignored = 0
    for delta in batch.deltas:
        if not transactions or transactions[-1].xid != delta.xid:
            transactions.append(Transaction(delta.xid))
        key = row_of(delta.key) if delta.HasField("key") else None
        new_row = row_of(delta.new_row) if delta.HasField("new_row") else None
        old_key = row_of(delta.old_key) if delta.HasField("old_key") else None
        try:
            changes = decode_change(delta.table, delta.op, key, new_row, old_key,
                                    delta.unchanged_toast_columns)
        except (BadDelta, KeyError, ValueError, TypeError) as error:
            # One malformed row must not stall the stream for everything behind it.
            log.warning("delta ignored", extra={"table": delta.table, "lsn": delta.lsn,
                                                "error": str(error)[:200]})
            changes = []
        if not changes:
            ignored += 1
        transactions[-1].changes.extend(changes)
        if delta.HasField("commit_time"):
            moment = delta.commit_time.ToDatetime(tzinfo=timezone.utc)
            latest = moment if latest is None or moment > latest else latest
    snapshot = bool(batch.snapshot)
    snapshot_lsn = 0
    if snapshot:
        # Snapshot rows carry the consistent point; an empty snapshot is one batch at that point.
        snapshot_lsn = batch.deltas[0].lsn if batch.deltas else batch.commit_lsn
    return DecodedBatch(batch.commit_lsn, snapshot, transactions, latest, ignored,
                        snapshot_begin=snapshot and bool(batch.snapshot_begin),
                        snapshot_end=snapshot and bool(batch.snapshot_end), snapshot_lsn=snapshot_lsn)


# ----------------------------------------------------------------------------- selection

def select_new(batch: DecodedBatch, progress: Progress) -> Selection:
    """Which changes of `batch` are new given `progress`, and the progress once they are applied."""
    every_change = [change for transaction in batch.transactions for change in transaction.changes]
    if batch.snapshot:
        if batch.snapshot_begin:
            if batch.snapshot_lsn == progress.snapshot_lsn and progress.snapshot_done:
                return Selection([], progress, skipped_transactions=len(batch.transactions))
            restart = progress.applied_lsn > 0 or progress.snapshot_lsn > 0
            return Selection(every_change,
                             Progress(applied_lsn=batch.commit_lsn, last_xid=0,
                                      snapshot_lsn=batch.snapshot_lsn, snapshot_done=batch.snapshot_end,
                                      stream_lsn=batch.commit_lsn),
                             restart_from_snapshot=restart)
        if batch.commit_lsn <= progress.applied_lsn:
            return Selection([], progress, skipped_transactions=len(batch.transactions))
        return Selection(every_change, replace(progress, applied_lsn=batch.commit_lsn, last_xid=0,
                                               snapshot_done=batch.snapshot_end,
                                               stream_lsn=batch.commit_lsn))

    if batch.commit_lsn <= progress.applied_lsn:
        return Selection([], progress, skipped_transactions=len(batch.transactions))
    transactions = batch.transactions
    skipped = 0
    if progress.last_xid:
        for position, transaction in enumerate(transactions):
            if transaction.xid == progress.last_xid:
                skipped = position + 1
                break
    last_xid = transactions[-1].xid if transactions else progress.last_xid
    changes = [change for transaction in transactions[skipped:] for change in transaction.changes]
    return Selection(changes, replace(progress, applied_lsn=batch.commit_lsn, last_xid=last_xid,
                                      stream_lsn=batch.commit_lsn),
                     skipped_transactions=skipped)
