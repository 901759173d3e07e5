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
