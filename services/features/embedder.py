"""One thread owns the model; everyone else hands it texts and waits for vectors.

Why one thread: the model already uses every core it is given (torch intra-op threads), so two
concurrent forward passes only fight over the same cores; one queue feeding one thread also
gives a natural place to form micro-batches. A model call takes at most `max_batch_size` texts.
Query work (EmbedText: small, latency-bound) goes ahead of bulk work (catalog items). When the
queue holds fewer texts than a full batch and a query is waiting, the thread waits up to
`max_wait_s` for other queries to share the call; bulk submissions arrive whole, so waiting
for them would only add latency.

`QueryEmbedder` adds an LRU cache in front for search queries, which repeat a lot.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from prometheus_client import Counter, Histogram

log = logging.getLogger(__name__)

MODEL_CALLS = Counter("deltarec_features_model_calls_total", "Forward passes of the embedding model")
MODEL_TEXTS = Counter("deltarec_features_model_texts_total", "Texts embedded by the model", ["kind"])
BATCH_SIZE = Histogram("deltarec_features_model_batch_size", "Texts per model call",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
CACHE_HITS = Counter("deltarec_features_query_cache_total", "Query embedding cache lookups", ["result"])

EncodeFn = Callable[[list[str]], np.ndarray]


class EmbedderClosed(RuntimeError):
    pass


@dataclass
class _Job:
    texts: list[str]
    vectors: np.ndarray | None
    remaining: int
    future: Future
    kind: str


class MicroBatcher:
    """Thread-safe; `embed(texts)` blocks until every text has its vector."""

    def __init__(self, encode: EncodeFn, *, max_batch_size: int = 64, max_wait_s: float = 0.005,
                 dim: int = 384) -> None:
        self._encode = encode
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.dim = dim
        self._lock = threading.Condition()
        # Pending (job, position) pairs per priority; a job may span several model calls.
        self._queries: collections.deque[tuple[_Job, int]] = collections.deque()
        self._bulk: collections.deque[tuple[_Job, int]] = collections.deque()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="embedder", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submitting
    def submit(self, texts: Sequence[str], *, kind: str = "bulk") -> Future:
        """Queues texts; the future resolves to a float32 [len(texts), dim] array."""
        future: Future = Future()
        if not texts:
            future.set_result(np.zeros((0, self.dim), dtype=np.float32))
            return future
        job = _Job(list(texts), None, len(texts), future, kind)
        # Length-sorted order inside a submission keeps padding (wasted compute) low per call.
        order = sorted(range(len(texts)), key=lambda i: len(job.texts[i]))
        with self._lock:
            if self._closed:
                raise EmbedderClosed("embedder is closed")
            queue = self._queries if kind == "query" else self._bulk
            queue.extend((job, position) for position in order)
            self._lock.notify()
        return future

    def embed(self, texts: Sequence[str], *, kind: str = "bulk") -> np.ndarray:
        return self.submit(texts, kind=kind).result()

    # ------------------------------------------------------------------ the model thread
    def _take(self) -> list[tuple[_Job, int]] | None:
        with self._lock:
            while not self._queries and not self._bulk:
                if self._closed:
                    return None
                self._lock.wait()
            if self._queries and len(self._queries) + len(self._bulk) < self.max_batch_size:
                # Give concurrent queries a moment to join this call.
                deadline = time.monotonic() + self.max_wait_s
                while len(self._queries) + len(self._bulk) < self.max_batch_size and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._lock.wait(left)
            taken = []
            for queue in (self._queries, self._bulk):
                while queue and len(taken) < self.max_batch_size:
                    taken.append(queue.popleft())
            return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            texts = [job.texts[position] for job, position in taken]
            try:
                vectors = np.asarray(self._encode(texts), dtype=np.float32)
            except Exception as error:  # noqa: BLE001 - fail the callers, keep the thread alive
                log.exception("embedding failed", extra={"texts": len(texts)})
                for job, _ in taken:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            MODEL_CALLS.inc()
            BATCH_SIZE.observe(len(texts))
            for row, (job, position) in enumerate(taken):
                if job.future.done():
                    continue
                if job.vectors is None:
                    job.vectors = np.empty((len(job.texts), vectors.shape[1]), dtype=np.float32)
                job.vectors[position] = vectors[row]
                job.remaining -= 1
                if job.remaining == 0:
                    MODEL_TEXTS.labels(job.kind).inc(len(job.texts))
                    job.future.set_result(job.vectors)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._queries) + list(self._bulk)
            self._queries.clear()
            self._bulk.clear()
            self._lock.notify_all()
        for job, _ in pending:
            if not job.future.done():
                job.future.set_exception(EmbedderClosed("embedder closed"))
        self._thread.join(timeout=30)


class LruCache:
    """A bounded mapping that forgets the least recently used entry first (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class QueryEmbedder:
    """Embeds search queries: cache first, then one micro-batched model call for the misses.
    Texts without a letter or digit get `fallback(text)` instead of model noise."""

    def __init__(self, batcher: MicroBatcher, cache: LruCache, *, usable: Callable[[str], bool],
                 fallback: Callable[[str], np.ndarray], model_ready: Callable[[], None] | None = None) -> None:
        """`model_ready()` raises (UNAVAILABLE) while the model is not loaded: a query must not
        queue behind bulk work that waits for the model (text_model.py)."""
        self.batcher, self.cache, self.usable, self.fallback = batcher, cache, usable, fallback
        self.model_ready = model_ready

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        output = np.empty((len(texts), self.batcher.dim), dtype=np.float32)
        misses: dict[str, list[int]] = {}
        for position, text in enumerate(texts):
            cached = self.cache.get(text)
            if cached is not None:
                CACHE_HITS.labels("hit").inc()
                output[position] = cached
            elif not self.usable(text):
                output[position] = self.fallback(text)
            else:
                CACHE_HITS.labels("miss").inc()
                misses.setdefault(text, []).append(position)
        if misses:
            if self.model_ready is not None:
                self.model_ready()
            unique = list(misses)
            vectors = self.batcher.embed(unique, kind="query")
            for text, vector in zip(unique, vectors):
                self.cache.put(text, vector)
                output[misses[text]] = vector
        return output
