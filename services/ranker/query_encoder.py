"""Query embeddings for Search: through features.EmbedText (`FeaturesClient.encode`) or MiniLM in
this process (`LocalEncoder`), behind an LRU (`CachedEncoder`)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

import numpy as np

from services.common.handler_pool import blocking


class QueryEncoder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...


class CachedEncoder:
    """LRU of query embeddings (shoppers repeat queries a lot)."""

    def __init__(self, encoder: QueryEncoder, capacity: int = 10_000) -> None:
        self.encoder, self.capacity = encoder, capacity
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def encode_one(self, text: str) -> np.ndarray:
        key = " ".join(text.split())
        with self._lock:
            vector = self._entries.get(key)
            if vector is not None:
                self._entries.move_to_end(key)
                return vector
        # A call to features' EmbedText, or milliseconds of MiniLM here without the GIL: other
        # handlers may run meanwhile (services/common/handler_pool.py).
        with blocking():
            vector = np.asarray(self.encoder.encode([key]), np.float32).reshape(-1)
        if self.capacity:
            with self._lock:
                self._entries[key] = vector
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        return vector


class LocalEncoder:
    """MiniLM in this process (RANKER_QUERY_ENCODER=local): no hop, ~100 MB more memory."""

    def __init__(self) -> None:
        from services.common.text_encoder import TextEncoder
        self._encoder = TextEncoder()
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            return self._encoder.encode(texts)
