"""What an item's embedding is computed from, and its fingerprint.

The content hash covers exactly the fields that feed the embedding (title, description,
category, brand) and nothing else, so a price, stock or attribute change never triggers a
re-embedding, while any change of the text does. Each field is length-prefixed before hashing
so that moving text between fields ("ab" + "c" vs "a" + "bc") changes the hash.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

# Bumped whenever `embedding_text` changes shape, so that stored vectors computed from the old
# text layout count as stale (their hash no longer matches) and are recomputed by a Resync.
TEXT_LAYOUT_VERSION = "v1"

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class ItemText:
    title: str = ""
    description: str = ""
    category: str = ""
    brand: str = ""

    @classmethod
    def from_row(cls, row: dict) -> "ItemText":
        return cls(*(str(row.get(name) or "") for name in ("title", "description", "category", "brand")))


def content_hash(text: ItemText) -> str:
    """sha256 hex of the embedding inputs (stable across processes and releases)."""
    digest = hashlib.sha256(TEXT_LAYOUT_VERSION.encode())
    for value in (text.title, text.description, text.category, text.brand):
        encoded = value.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def clean(value: str) -> str:
    """Control characters out, whitespace collapsed: they only cost tokens."""
    return " ".join(_CONTROL.sub(" ", value).split())


def embedding_text(text: ItemText) -> str:
    """The string given to the model. Title first: the model reads at most 256 tokens, and a long
    description must not push the title out. Empty fields are left out."""
    parts = [clean(text.title), clean(text.brand), clean(text.category), clean(text.description)]
    return ". ".join(part for part in parts if part)


def is_usable(model_text: str) -> bool:
    """False for text the model can only turn into noise: empty, or without a single letter or
    digit (punctuation, symbols, invisible characters)."""
    return any(unicodedata.category(ch)[0] in "LN" for ch in model_text)


def pack_vector(vector: np.ndarray) -> bytes:
    """Little-endian float32 bytes: the wire format of deltarec.v1.Vector and the stored form."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def unpack_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")
