"""`RebuildUsers`: users' state (history, counters, recent queries) recomputed from the `events`
table, exact under the delta stream's rules.

The rebuild locks the consumer's progress row (the applier cannot commit meanwhile), reads the
users' events together with the Postgres snapshot they were read in (ONE statement), folds them
from scratch and stores the state with that snapshot (`user_features.rebuilt_snapshot`). Every
event visible in the snapshot is folded in, but the stream may still deliver some of them
(committed, not yet applied): for such a user the applier then skips the events of transactions
visible in the snapshot (`visible_in`) and folds the others, committed after it, as usual. So
each event counts once whether it was in flight or not, and a repeated rebuild gives the same
state (idempotent). A new snapshot of the consumer group resets user state and the marks with it.

The rewritten rows must reach the rankers' user caches through WatchUsers, which announces a
row when its updated_lsn passes a watcher's position. So the rebuild is one of the applier's
stamped writes (`FeatureApplier.stamped_write`, as Resync): its rows carry applied_lsn + 1 and
the watermark moves there with them. A user left without events keeps a row with an empty
state (the same as no row for every reader: GetUserFeatures, the consistency digests) instead
of being deleted — a deleted row is never announced, and a cache would keep the old state.
"""
from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from services.common.errors import FailedPrecondition
from services.contracts.event_row import EventRow
from services.features.user_state import UserState

MAX_REBUILD_USERS = 10_000


@dataclass(frozen=True)
class Snapshot:
    """A pg_snapshot (`xmin:xmax:xip,...`, 64-bit xids): transactions below xmin are visible,
    at or above xmax are not, and between them those not listed as in progress are."""
    xmin: int
    xmax: int
    in_progress: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> "Snapshot":
        xmin, xmax, listed = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in listed.split(",") if x))

    def full_xid(self, xid32: int) -> int:
        """The 64-bit xid of a 32-bit one from the replication stream, in xmax's epoch or the
        one before (a transaction the stream delivers is never far from the snapshot)."""
        candidate = (self.xmax & ~0xFFFFFFFF) | (xid32 & 0xFFFFFFFF)
        return candidate - (1 << 32) if candidate > self.xmax + (1 << 31) else candidate

    def visible(self, xid32: int) -> bool:
        xid = self.full_xid(xid32)
        return xid < self.xmin or (xid < self.xmax and xid not in self.in_progress)


def visible_in(snapshot_text: str | None, xid32: int) -> bool:
    """Whether transaction `xid32` is already folded into a state rebuilt from `snapshot_text`."""
    return bool(snapshot_text) and bool(xid32) and Snapshot.parse(snapshot_text).visible(xid32)


@dataclass
class RebuildReport:
    rebuilt: int = 0
    removed: int = 0
    events: int = 0
    data_lsn: int = 0


def fold_from_scratch(user_id: str, events: list[EventRow], lsn: int, settings) -> UserState:
    """The state of a user given all their events (event-time order, ties by row id), folded by
    the applier's own fold (`fold_changes`), so a rebuilt state is what the stream would build."""
    from services.features.applier import fold_changes     # the applier imports this module
    users = {user_id: UserState(user_id)}
    fold_changes(sorted(events, key=lambda e: (e.occurred_at, e.row_id)), lsn, {}, users, {}, settings)
    state = users[user_id]
    state.updated_lsn = lsn
    return state


def is_empty(state: UserState) -> bool:
    """A state no event contributed to: what an unknown user reads as."""
    return not (state.history or state.counters or state.recent_queries or state.seen)


class UserRebuilder:
    def __init__(self, applier) -> None:
        """`applier`: the FeatureApplier (its store, settings and stamped writes)."""
        self.applier = applier
        self.store, self.settings = applier.store, applier.settings

    def rebuild(self, user_ids: list[str]) -> RebuildReport:
        ids = sorted(set(user_ids))
        report = RebuildReport()
        with self.applier.stamped_write("resyncs or user rebuilds") as write:
            connection, progress, stamp = write.connection, write.progress, write.stamp
            if not progress.snapshot_done:
                raise FailedPrecondition("the consumer group's initial snapshot is not applied yet; "
                                         "rebuild once it is")
            rows = connection.execute(sa.text(
                "WITH s AS (SELECT pg_current_snapshot()::text AS snap) "
                "SELECT s.snap, e.id, e.event_id, e.event_type, e.user_id, e.item_id, e.query, e.occurred_at "
                "FROM s LEFT JOIN events e ON e.user_id = ANY(:ids)"), {"ids": ids}).all()
            snapshot = rows[0].snap
            events: dict[str, list[EventRow]] = {}
            for row in rows:
                if row.event_id is not None:
                    events.setdefault(row.user_id, []).append(EventRow(
                        event_id=row.event_id, event_type=row.event_type, user_id=row.user_id,
                        item_id=row.item_id, query=row.query, occurred_at=row.occurred_at,
                        row_id=int(row.id)))
            states = [fold_from_scratch(user_id, user_events, stamp, self.settings)
                      for user_id, user_events in sorted(events.items())]
            # Users without events that still have a (non-empty) state: emptied, not deleted.
            gone = [user_id for user_id in ids if user_id not in events]
            emptied = [UserState(user_id, updated_lsn=stamp)
                       for user_id, state in sorted(self.store.load_users(connection, gone, lock=True).items())
                       if not is_empty(state)]
            written = states + emptied
            self.store.save_users(connection, written)
            if written:
                self.store.mark_rebuilt(connection, [state.user_id for state in written], snapshot)
            report.rebuilt, report.removed = len(states), len(emptied)
            report.events = sum(map(len, events.values()))
            report.data_lsn = stamp
        return report
