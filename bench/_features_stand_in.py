"""The features stand-in (tests/fakes.FeaturesStandIn) as a process: `python -m _features_stand_in`
with BENCH_CATALOG=beauty or synthetic:N, started by `_harness.Suite.start_features_stand_in`.
Not a benchmark (`make bench` skips files whose name starts with `_`)."""
from __future__ import annotations

import os

import _harness
from tests.fakes import serve_features_stand_in  # noqa: E402

if __name__ == "__main__":
    serve_features_stand_in(*_harness.bench_catalog(os.environ["BENCH_CATALOG"]))
