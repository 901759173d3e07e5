"""python -m services.ranker — one ranker replica (replica_process.py), or with RANKER_WORKERS > 1
a supervisor of that many worker processes, each a complete replica serving the same port
(supervisor.py, workers.py).
"""
from __future__ import annotations

import os
import sys

# Requests run in parallel threads: one intra-op thread each, for every BLAS in the process.
# (Must be set before numpy / torch / faiss are imported; the workers inherit it.)
_THREADS = os.environ.get("RANKER_TORCH_THREADS", "1")
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, _THREADS)


def main(drop_feed_updates=None) -> int:
    """`drop_feed_updates`: a failure drill's hook (tests/ranker_drills.py); the service runs without."""
    from services.common.boot import Boot
    from services.ranker.config import RankerConfig, check_settings
    boot = Boot.load("ranker", RankerConfig, check=check_settings)
    if boot.config.workers > 1:
        from services.ranker.supervisor import supervise
        return supervise(boot)
    from services.ranker.replica_process import serve
    return serve(boot, drop_feed_updates)


if __name__ == "__main__":
    sys.exit(main())
