"""The text an item's MiniLM vector is computed from.

The features service embeds every catalog item from this text (and stores the vector in
`item_features`); the trainer embeds an item the features service has not reached yet from the
SAME text, so that both vectors agree; the ranker's Search embeds queries into the same space.
Change `embedding_text` only together with `TEXT_LAYOUT_VERSION`.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

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
