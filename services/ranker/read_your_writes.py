"""Read-your-writes: a request's min_data_lsn is honoured by waiting until this replica has applied
that position of the data stream (within the call's deadline), else FAILED_PRECONDITION carrying
the replica's watermark so the client can retry later or elsewhere."""
from __future__ import annotations

import time

from services.common.errors import FailedPrecondition
from services.ranker import metrics
from services.ranker.catalog import Catalog


class DataBehind(FailedPrecondition):
    """min_data_lsn not reached within the deadline; carries this replica's watermark."""

    def __init__(self, watermark: int, wanted: int) -> None:
        super().__init__(f"data watermark {watermark} is behind min_data_lsn {wanted}; retry later "
                         f"or on another replica")
        self.watermark, self.wanted = watermark, wanted


def wait_for_lsn(catalog: Catalog, min_lsn: int, timeout_s: float | None, max_wait_s: float) -> None:
    """Read-your-writes: wait (within the call's deadline, at most max_wait_s) until this replica
    applied `min_lsn`, else DataBehind."""
    if not min_lsn or catalog.watermark >= min_lsn:
        return
    wait = max_wait_s if timeout_s is None else min(max_wait_s, timeout_s * 0.9 - 0.005)
    started = time.monotonic()
    reached = wait > 0 and catalog.wait_for(min_lsn, wait)
    metrics.MIN_LSN_WAIT.observe(time.monotonic() - started)
    if not reached:
        raise DataBehind(catalog.watermark, min_lsn)


# ---------------------------------------------------------------------- an answer's data_lsn
#
# An answer is computed from two parts of the data: the replica's items (the catalog: every item
# change up to its watermark W, read before the answer uses it; it only grows) and the user's
# state (exact as of D — the features read's snapshot, or the user-change stream's position for a
# cached entry — whose latest change is at U <= D). `data_lsn` claims "this answer includes every
# write up to here", so it may not exceed what any part includes: L <= min(W, D). And it may not be
# older than what the answer reflects of the user: L >= U. Both hold with L = min(W, D) exactly
# when W >= U; when the user's state was read fresher than the items (W < U: the item feed is one
# round behind the read), the request waits for the items to reach U — a short wait, since
# features had applied D >= U when it answered and its item feed follows every commit. If they do
# not get there in time no valid position exists: the answer keeps the safe bound min(W, D) (a
# client's min_data_lsn is never met by data it lacks) and says it is degraded. A user the answer
# has no state for (features down and nothing cached) includes none of that user's writes: 0.


def answer_lsn(catalog: Catalog, item_lsn: int, user_lsn: int | None, user_updated_lsn: int,
               time_left_s: float | None, max_wait_s: float) -> tuple[int, bool]:
    """(data_lsn, consistent) of an answer over items at `item_lsn` and a user state exact as of
    `user_lsn` (None: the answer has no user part; 0: a user part with no known state) whose
    latest change is at `user_updated_lsn`. Waits for the items to reach the user's latest change
    when they are behind it (at most max_wait_s and half the time left)."""
    if user_lsn is None:
        return item_lsn, True
    if item_lsn < user_updated_lsn:
        wait = max_wait_s if time_left_s is None else min(max_wait_s, time_left_s * 0.5)
        started = time.monotonic()
        caught_up = wait > 0 and catalog.wait_for(user_updated_lsn, wait)
        metrics.CONSISTENCY_WAIT.observe(time.monotonic() - started)
        item_lsn = catalog.watermark
        if not caught_up:
            metrics.INCONSISTENT_ANSWERS.inc()
            return min(item_lsn, user_lsn), False
    return min(item_lsn, user_lsn), True


def check_read_your_writes(data_lsn: int, min_lsn: int) -> None:
    """An answer whose parts are older than min_data_lsn (the user's state read below it: a
    feature store that went back) would silently miss the caller's write: DataBehind instead."""
    if min_lsn and data_lsn < min_lsn:
        raise DataBehind(data_lsn, min_lsn)
