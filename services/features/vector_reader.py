"""How other services read the feature store's item text vectors.

The features service owns `item_features` (its layout is its business: services/features/store.py
writes it). A service that shares the database and needs item text vectors in bulk, the trainer,
reads them through these functions instead of its own SQL, so the table can change without the
reader noticing. Vectors are the stored MiniLM embeddings (packed little-endian float32, 384-d);
a row whose vector is missing, of another size or not finite is left out, and the caller
decides what to do for those items.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.common.text_encoder import MINILM_DIM
from services.features.content import unpack_vector


def read_text_vectors(connection: Connection, item_ids: Iterable[str]) -> dict[str, np.ndarray]:
    """item_id -> its stored text vector (float32, MINILM_DIM), for the ids that have a usable one."""
    result: dict[str, np.ndarray] = {}
    for item_id, blob in connection.execute(sa.text(
            "SELECT item_id, embedding FROM item_features "
            "WHERE embedding IS NOT NULL AND item_id = ANY(:ids)"), {"ids": list(item_ids)}):
        vector = unpack_vector(bytes(blob))
        if vector.shape == (MINILM_DIM,) and np.isfinite(vector).all():
            result[item_id] = vector.astype(np.float32)
    return result


def text_vector_coverage(connection: Connection) -> tuple[int, int]:
    """(active catalog items with a stored text vector, active catalog items)."""
    row = connection.execute(sa.text(
        "SELECT count(f.item_id), count(*) FROM items i LEFT JOIN item_features f "
        "ON f.item_id = i.item_id AND f.embedding IS NOT NULL WHERE i.active")).one()
    return int(row[0]), int(row[1])
