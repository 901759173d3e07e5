"""Item side inputs of a run: which items exist and are active, and their text vectors.

Text vectors come from the feature store (computed by the features service with MiniLM, read
through its reader services/features/vector_reader.py). An item the features service has not
embedded yet gets one computed here from the same text the features service embeds
(`services.contracts.item_text.embedding_text`), with the same model; an item with no usable
text (or not in the catalog) gets the deterministic hashed vector of "item:<id>". Vectors
computed here are memoised per (item, text) for the life of the process.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from typing import Iterable

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.common.text_encoder import MINILM_DIM, hashed_unit_vector
from services.contracts.item_text import ItemText, embedding_text, is_usable
from services.features.vector_reader import read_text_vectors, text_vector_coverage

log = logging.getLogger(__name__)


def fallback_vector(item_id: str) -> np.ndarray:
    return hashed_unit_vector(f"item:{item_id}", MINILM_DIM)


class Catalog:
    def __init__(self, engine: Engine, fallback: str = "minilm") -> None:
        self.engine, self.fallback = engine, fallback
        self._memo: dict[tuple[str, str], np.ndarray] = {}
        self._encoder = None
        self._lock = threading.Lock()
        self.stats = {"from_features": 0, "encoded_here": 0, "hashed": 0}

    def items(self) -> tuple[list[str], list[str]]:
        """(every catalog item id, active ones), sorted."""
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT item_id, active FROM items ORDER BY item_id")).all()
        return [r[0] for r in rows], [r[0] for r in rows if r[1]]

    def text_coverage(self) -> tuple[int, int]:
        """(active catalog items with a feature-store vector, active catalog items)."""
        with self.engine.connect() as connection:
            return text_vector_coverage(connection)

    def vectors(self, item_ids: Iterable[str]) -> dict[str, np.ndarray]:
        wanted = list(dict.fromkeys(item_ids))
        with self.engine.connect() as connection:
            result = read_text_vectors(connection, wanted)
            missing = [item_id for item_id in wanted if item_id not in result]
            texts: dict[str, str] = {}
            if missing:
                for item_id, title, description, category, brand in connection.execute(sa.text(
                        "SELECT item_id, title, description, category, brand FROM items "
                        "WHERE item_id = ANY(:ids)"), {"ids": missing}):
                    texts[item_id] = embedding_text(ItemText(title or "", description or "", category or "",
                                                             brand or ""))
        self.stats["from_features"] = len(result)
        self._fill_missing(missing, texts, result)
        return result

    def _fill_missing(self, missing: list[str], texts: dict[str, str], result: dict[str, np.ndarray]) -> None:
        to_encode: list[tuple[str, str]] = []
        hashed = 0
        for item_id in missing:
            text = texts.get(item_id, "")
            if not is_usable(text):
                result[item_id] = fallback_vector(item_id)
                hashed += 1
                continue
            if self.fallback == "hash":
                key = (item_id, hashlib.sha256(text.encode()).hexdigest())
                result[item_id] = self._memo.setdefault(key, hashed_unit_vector(f"text:{text}", MINILM_DIM))
                hashed += 1
                continue
            memo = self._memo.get((item_id, text))
            if memo is not None:
                result[item_id] = memo
            else:
                to_encode.append((item_id, text))
        if to_encode:
            log.info("embedding item texts the feature store does not have yet", extra={"items": len(to_encode)})
            vectors = self._encode([text for _, text in to_encode], [item_id for item_id, _ in to_encode])
            for (item_id, text), vector in zip(to_encode, vectors):
                self._memo[(item_id, text)] = vector
                result[item_id] = vector
        self.stats["encoded_here"] = len(to_encode)
        self.stats["hashed"] = hashed

    def _encode(self, texts: list[str], keys: list[str]) -> np.ndarray:
        with self._lock:
            if self._encoder is None:
                from services.common.text_encoder import TextEncoder
                self._encoder = TextEncoder()
            return self._encoder.encode(texts, batch_size=64, fallback_keys=[f"item:{k}" for k in keys])
