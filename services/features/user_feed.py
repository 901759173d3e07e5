"""The user-change feed behind WatchUsers: "user U changed at LSN L", after a watermark, then live.

Rankers keep a bounded cache of users' state; this feed keeps it exact. The store is the feed:
every user row carries `updated_lsn`, the commit LSN of the batch that last changed it, and the
applied watermark commits with it. A watcher's position is a watermark W; a round reads the
current watermark U and sends every user with W < updated_lsn <= U (keyset pages in
(updated_lsn, user_id) order, `user_features_updated_lsn` index), ending with U. Unlike the item
feed, a round sends a message whenever the watermark moved, with or without users: the receiver's
position follows every commit, which is what lets a ranker answer a `min_data_lsn` for a write
that touched no item at once. A user changed again during a round has an updated_lsn above U
and goes out in the next round, with its latest LSN.

Any writer of user state must keep this true: stamp the rows it changes with an updated_lsn above
the watermark it moves to (as Resync stamps items), and keep a row (an empty state) for a user it
removes instead of deleting it — a deleted row is never announced, so a watcher would keep the
user's old state.

after_lsn = 0 means "from now": a receiver with nothing cached has nothing to replay, so the
first message is the bare current watermark. A store that went back below a watcher's position
(rebuilt from a new snapshot) refuses it with FAILED_PRECONDITION: start again from 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from services.common.errors import FailedPrecondition
from services.features.item_feed import LsnNotifier
from services.features.store import FeatureStore


@dataclass(frozen=True)
class UserPage:
    changes: list[tuple[str, int]]     # (user id, LSN of its latest change)
    # The receiver knows of every user change up to here once it applied this page.
    watermark: int


class UserChangeFeed:
    def __init__(self, store: FeatureStore, notifier: LsnNotifier, *, poll_s: float = 1.0) -> None:
        self.store, self.notifier, self.poll_s = store, notifier, poll_s

    def pages(self, after_lsn: int, max_batch: int, active: Callable[[], bool]) -> Iterator[UserPage]:
        applied = self.store.applied_lsn()
        if after_lsn == 0:
            watermark = applied
            yield UserPage([], watermark)
        elif applied < after_lsn:
            raise FailedPrecondition(
                f"after_lsn: {after_lsn} is ahead of the feature store ({applied}); it was rebuilt from a "
                "new snapshot: watch again from after_lsn=0")
        else:
            watermark = after_lsn
        while active() and not self.notifier.closed:
            # A round: every user whose row is past the position, in keyset pages. A page and the
            # watermark it may claim come from one statement (one snapshot), and only the page that
            # ends a round claims one: a user that changes again while a round runs moves its row
            # ahead of the cursor (rows only move forward), so it is still sent in this round, at
            # its latest LSN, before the position passes its earlier change. Pages that do not end
            # the round keep the position where it was (claiming the last row's LSN would pass a
            # change whose row has moved beyond the page).
            notified = self.notifier.lsn      # committed before this round's reads
            cursor: tuple[int, str | None] = (watermark, None)
            while True:
                rows, applied = self.store.read_user_changes(cursor, max_batch)
                if applied < watermark:
                    raise FailedPrecondition(
                        f"after_lsn: {watermark} is ahead of the feature store ({applied}); it was rebuilt "
                        "from a new snapshot: watch again from after_lsn=0")
                if len(rows) == max_batch:
                    yield UserPage(rows, watermark)
                    cursor = (rows[-1][1], rows[-1][0])
                    continue
                if rows or applied > watermark:
                    yield UserPage(rows, applied)
                    watermark = applied
                break
            # Woken by a commit of this process; after a quiet poll interval, a round anyway
            # (writers in other processes; a rebuilt store).
            self.notifier.wait_beyond(max(watermark, notified), self.poll_s)
