"""Sampling profile of a running service process (py-spy), summarised by where the time goes.

Used by `bench/ranker.py --profile`: py-spy (`pip install py-spy`; a development tool, not a
dependency of the services) samples the ranker while the load generator runs, in "raw" (collapsed
stacks) format, without pausing the process (`--nonblocking`). Only the thread holding the GIL is
sampled (`--gil`): the shares below are shares of the Python CPU time of the process (waiting
threads and native code running without the GIL, like faiss' inner loops, are not counted). Each sample is charged to the first
category (in CATEGORIES order) any frame of its stack matches, so a faiss call made while
holding a lock counts as faiss, and "grpc server" is what is left of gRPC's own Python machinery.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# (category, substrings of a frame "function (file:line)"); first match wins, innermost frame first.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("user features fetch (GetUserFeatures)", ("features_client.py", "user_feed.py")),
    ("user tower", ("numpy_tower.py", "user_vector.py", "model_bundle.py:user_vector",
                    "history_vectors")),
    ("impressions (attribution)", ("attribution.py", "impressions.py", "recommendation_id.py", "psycopg2")),
    ("faiss search", ("faiss", "vector_index.py", "index_structures.py")),
    ("filters and exclusions", ("filters.py", "seen_filter.py", "_excluded")),
    ("query embedding (EmbedText)", ("query_encoder.py",)),
    ("lexical (BM25)", ("lexical.py",)),
    ("locks and waits", ("threading.py", "acquire", "rwlock.py")),
    ("access log + metrics (interceptor)", ("record (", "logging/__init__.py", "logs.py",
                                            "prometheus_client", "_status_of")),
    ("message building", ("server.py:_items", "server.py:_freshness", "_items", "SerializeToString",
                          "FromString", "protobuf", "filters_from", "session_from")),
    ("admission control", ("admission.py",)),
    ("recommend / search logic", ("recommend.py", "retrieval.py", "request_path.py", "catalog.py",
                                  "session.py", "user_cache.py", "search.py", "read_your_writes.py")),
    ("other ranker code", ("services/ranker/", "services/common/")),
    ("grpc server", ("grpc/_server.py", "grpc/_common.py", "_cython", "concurrent/futures")),
)


def available() -> bool:
    return _py_spy() is not None


def _py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, duration_s: float, out: Path, rate: int = 200) -> subprocess.Popen:
    """Starts sampling `pid` for `duration_s` into `out` (raw format); wait() on the result."""
    return subprocess.Popen([_py_spy(), "record", "--pid", str(pid), "--duration", str(int(max(duration_s, 1))),
                             "--rate", str(rate), "--format", "raw", "--nonblocking", "--gil", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def categorise(stack: str) -> str:
    frames = stack.split(";")[::-1]   # innermost first
    for frame in frames:
        for name, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return name
    return "other"


def summarise(raw: Path, top: int = 12) -> dict:
    """Shares (%) per category and the top self-time functions of a raw py-spy file."""
    totals: Counter = Counter()
    self_time: Counter = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        totals[categorise(stack)] += n
        self_time[stack.split(";")[-1].split(" (")[0] + " (" + stack.split(";")[-1].rsplit("/", 1)[-1]] += n
    if not samples:
        return {"samples": 0}
    return {"samples": samples,
            "share_pct": {name: round(100.0 * count / samples, 1) for name, count in totals.most_common()},
            "top_self_pct": {name: round(100.0 * count / samples, 1) for name, count in self_time.most_common(top)}}
