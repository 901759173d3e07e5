"""Python's cyclic garbage collector, measured: every collection holds the interpreter for as long
as it walks the objects of the generations it collects, and every request thread waits meanwhile.
A service that keeps a large long-lived heap (the ranker's catalog and user cache, the features
store's tables) pays for walking it again in each full (generation 2) collection, although
nothing in it is garbage — a classic source of tail latency in Python servers.

`install()` (Boot.load, so every service) times each collection (`gc.callbacks`) into
`deltarec_gc_pause_seconds{generation}` and counts what it freed, so a tail latency can be
checked against the collector instead of guessed at. Measured on the ranker under load
(bench/ranker.py prints each level's collections): no full collection during the runs and
generation 0/1 pauses of ~0.2-0.3 ms each, under 0.5% of the time: the collector is not what
sets the ranker's p99, so nothing tunes it (no gc.freeze, default thresholds).
"""
from __future__ import annotations

import gc
import time

from prometheus_client import Counter, Histogram

GC_PAUSE = Histogram("deltarec_gc_pause_seconds", "time the cyclic garbage collector held the interpreter",
                     ["generation"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
GC_COLLECTED = Counter("deltarec_gc_collected_objects_total", "objects freed by the cyclic garbage collector",
                       ["generation"])

_state = {"started": 0.0}
_pause_children = {g: GC_PAUSE.labels(generation=str(g)) for g in (0, 1, 2)}
_collected_children = {g: GC_COLLECTED.labels(generation=str(g)) for g in (0, 1, 2)}


def _on_collection(phase: str, info: dict) -> None:
    # Runs inside the collection with the GIL held (collections never overlap): the start time
    # needs no lock.
    if phase == "start":
        _state["started"] = time.perf_counter()
        return
    generation = info.get("generation", 2)
    _pause_children[generation].observe(time.perf_counter() - _state["started"])
    collected = info.get("collected", 0)
    if collected:
        _collected_children[generation].inc(collected)


def install() -> None:
    """Idempotent: one callback per process (called once, from Boot.load)."""
    if _on_collection not in gc.callbacks:
        gc.callbacks.append(_on_collection)
