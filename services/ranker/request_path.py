"""What every Recommend, Search and SimilarItems request goes through besides its own logic.

In this order: its arguments are checked (by the caller, `arguments.py`), then the
read-your-writes wait for `min_data_lsn` (`read_your_writes.py`), then admission control
(`admission.py`), then its own work, which reads the user's history through the short-lived
cache or, when features is unreachable, degrades to an answer without it, and states the
answer's data_lsn (`data_lsn`). The wait comes before admission because waiting for the data
costs no CPU: it must not hold a slot that other requests could compute in. (The one wait inside
a slot is data_lsn's: items one feed round behind a user read fresher than them, milliseconds.) The gRPC edge only translates messages; a caller in the same process gets the
same behaviour.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from services.common.errors import Unavailable
from services.ranker import metrics
from services.ranker.admission import AdmissionControl
from services.ranker.catalog import Catalog
from services.ranker.read_your_writes import answer_lsn, check_read_your_writes, wait_for_lsn
from services.ranker.user_cache import CachedUser, FeaturesUnavailable, UserCache, UserHistory


class RequestPath:
    def __init__(self, catalog: Catalog, users: UserCache, admission: AdmissionControl | None = None, *,
                 history_length: int = 50, max_wait_s: float = 5.0) -> None:
        self.catalog, self.users, self.admission = catalog, users, admission
        self.history_length, self.max_wait_s = history_length, max_wait_s

    @contextmanager
    def admitted(self, min_lsn: int, timeout_s: float | None) -> Iterator[float | None]:
        """Waits for `min_lsn` (else DataBehind), then for a slot (else Overloaded); yields the
        time left of the call's deadline for the work (None: no deadline)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        wait_for_lsn(self.catalog, min_lsn, timeout_s, self.max_wait_s)
        if self.admission is None:
            yield _left(deadline)
            return
        with self.admission.admit(_left(deadline)):
            yield _left(deadline)

    def user(self, user_id: str, min_lsn: int, timeout_s: float | None) -> CachedUser:
        """The user's history (through the cache). When features is unreachable: the replica's
        last known state of the user, or an empty one, both marked `degraded` (the answer says
        so), unless the request asked to read its own writes (min_lsn) and the cache has nothing
        that recent, which an answer would not honour: UNAVAILABLE."""
        try:
            cached = self.users.get(user_id, self.history_length, min_lsn, timeout_s)
        except FeaturesUnavailable as error:
            if min_lsn:
                raise Unavailable(f"user features unavailable: {error}") from None
            metrics.DEGRADED.inc()
            return CachedUser(UserHistory(), time.monotonic(), degraded=True)
        if cached.degraded:
            metrics.DEGRADED.inc()
        return cached


    def data_lsn(self, item_lsn: int, cached: CachedUser | None, min_lsn: int,
                 timeout_s: float | None) -> tuple[int, bool]:
        """(data_lsn, consistent) of an answer over the items at `item_lsn` (the catalog's
        watermark read before the answer used it) and the user's state `cached` (None: no user
        part); the rule is in `read_your_writes.py`. Waits for the items when the user's state is
        fresher than them; DataBehind when the user's state is older than min_lsn."""
        if cached is None:
            return item_lsn, True
        history = cached.history
        # A degraded answer (features unreachable, so is its item feed) does not wait for items.
        lsn, consistent = answer_lsn(self.catalog, item_lsn, history.data_lsn, history.updated_lsn,
                                     0.0 if cached.degraded else timeout_s, self.max_wait_s)
        if not cached.degraded:
            check_read_your_writes(lsn, min_lsn)
        return lsn, consistent


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)
