"""An item's content fingerprint and the stored form of its vector.

The content hash covers exactly the fields that feed the embedding (title, description,
category, brand; `services/contracts/item_text.py`) and nothing else, so a price, stock or
attribute change never triggers a re-embedding, while any change of the text does. Each field
is length-prefixed before hashing so that moving text between fields ("ab" + "c" vs "a" + "bc")
changes the hash.
"""
from __future__ import annotations

import hashlib

import numpy as np

from services.contracts.item_text import TEXT_LAYOUT_VERSION, ItemText


def content_hash(text: ItemText) -> str:
    """sha256 hex of the embedding inputs (stable across processes and releases)."""
    digest = hashlib.sha256(TEXT_LAYOUT_VERSION.encode())
    for value in (text.title, text.description, text.category, text.brand):
        encoded = value.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def pack_vector(vector: np.ndarray) -> bytes:
    """Little-endian float32 bytes: the wire format of deltarec.v1.Vector and the stored form."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def unpack_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")
