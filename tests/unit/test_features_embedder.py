"""Micro-batching of model calls and the query cache. The model is replaced by a small
deterministic function of the text (what is tested is batching, not embedding)."""
import threading

import numpy as np

from services.features.embedder import LruCache, MicroBatcher, QueryEmbedder


class CountingEncoder:
    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[list[str]] = []
        self.gate = gate
        self.entered = threading.Event()     # the model thread is inside a call

    def __call__(self, texts):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        self.calls.append(list(texts))
        return np.array([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts], dtype=np.float32)


def expected(texts):
    return np.array([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts], dtype=np.float32)


def test_vectors_come_back_in_submission_order_in_bounded_calls():
    encoder = CountingEncoder()
    batcher = MicroBatcher(encoder, max_batch_size=4, max_wait_s=0.0, dim=3)
    texts = [f"text number {'x' * (i % 5)} {i}" for i in range(10)]
    try:
        np.testing.assert_array_equal(batcher.embed(texts), expected(texts))
    finally:
        batcher.close()
    assert sorted(len(call) for call in encoder.calls) == [2, 4, 4]
    assert all(len(call) <= 4 for call in encoder.calls)


def test_concurrent_submissions_share_model_calls():
    gate = threading.Event()
    encoder = CountingEncoder(gate)
    batcher = MicroBatcher(encoder, max_batch_size=64, max_wait_s=0.0, dim=3)
    try:
        first = batcher.submit(["warm-up"])                  # holds the model thread at the gate
        encoder.entered.wait(10)
        futures = [batcher.submit([f"q{i}"], kind="query") for i in range(20)]
        gate.set()
        for i, future in enumerate(futures):
            np.testing.assert_array_equal(future.result(timeout=10), expected([f"q{i}"]))
        first.result(timeout=10)
    finally:
        batcher.close()
    # The 20 queries waited together and went in one call after the warm-up.
    assert [len(call) for call in encoder.calls] == [1, 20]


def test_queries_go_before_bulk_work():
    gate = threading.Event()
    encoder = CountingEncoder(gate)
    batcher = MicroBatcher(encoder, max_batch_size=2, max_wait_s=0.0, dim=3)
    try:
        blocker = batcher.submit(["blocker"])
        encoder.entered.wait(10)
        bulk = batcher.submit(["b1", "b2", "b3", "b4"])
        query = batcher.submit(["query"], kind="query")
        gate.set()
        query.result(timeout=10), bulk.result(timeout=10), blocker.result(timeout=10)
    finally:
        batcher.close()
    assert encoder.calls[1][0] == "query"


def test_a_failing_model_call_fails_its_callers_only():
    def encode(texts):
        if "boom" in texts:
            raise RuntimeError("model failed")
        return expected(texts)
    batcher = MicroBatcher(encode, max_batch_size=8, max_wait_s=0.0, dim=3)
    try:
        failed = batcher.submit(["boom"])
        assert isinstance(failed.exception(timeout=10), RuntimeError)
        np.testing.assert_array_equal(batcher.embed(["fine"]), expected(["fine"]))
    finally:
        batcher.close()


def test_empty_submission():
    batcher = MicroBatcher(expected, dim=3)
    try:
        assert batcher.embed([]).shape == (0, 3)
    finally:
        batcher.close()


def test_lru_cache_forgets_the_least_recently_used():
    cache = LruCache(2)
    cache.put("a", np.zeros(1))
    cache.put("b", np.ones(1))
    assert cache.get("a") is not None      # a is now the most recent
    cache.put("c", np.ones(1))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2


def test_query_embedder_caches_deduplicates_and_falls_back():
    encoder = CountingEncoder()
    batcher = MicroBatcher(encoder, max_batch_size=64, max_wait_s=0.0, dim=3)
    fallback = np.array([0.0, 0.0, 1.0], dtype=np.float32)
    queries = QueryEmbedder(batcher, LruCache(100), usable=lambda t: any(c.isalnum() for c in t),
                            fallback=lambda t: fallback)
    try:
        first = queries.embed(["lip balm", "lip balm", "???", "serum"])
        second = queries.embed(["serum", "lip balm"])
    finally:
        batcher.close()
    np.testing.assert_array_equal(first[0], expected(["lip balm"])[0])
    np.testing.assert_array_equal(first[1], first[0])
    np.testing.assert_array_equal(first[2], fallback)
    np.testing.assert_array_equal(second, expected(["serum", "lip balm"]))
    assert sorted(encoder.calls[0]) == ["lip balm", "serum"] and len(encoder.calls) == 1
