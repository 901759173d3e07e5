"""An item's features (catalog fields, vector, statistics) and how catalog changes fold into them.

Pure data and functions. `fold_catalog_change` decides what changed; the applier computes the
vectors that are due (content hash changed, or the stored one came from another model) in one
micro-batched model run and sets them with `set_embedding`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from services.contracts.item_text import ItemText, embedding_text, is_usable
from services.features.content import content_hash
from services.features.deltas import ItemRow
from services.features.item_stats import ItemStats


@dataclass
class ItemRecord:
    item_id: str
    in_catalog: bool = False
    active: bool = False
    content_hash: str | None = None
    embedding: bytes | None = None
    embedding_model: str | None = None
    fallback_embedding: bool = False
    title: str = ""
    category: str = ""
    brand: str = ""
    price: Decimal | None = None
    currency: str | None = None
    stats: ItemStats = field(default_factory=ItemStats)
    # LSN of the last change of catalog data or vector (what WatchItems sends); 0 = never in the
    # catalog (a row holding statistics only).
    updated_lsn: int = 0

    @property
    def listed(self) -> bool:
        """In the active set: what rankers may recommend and find."""
        return self.in_catalog and self.active


@dataclass(frozen=True)
class EmbeddingTask:
    """A vector to compute: `model_text` for the model, `key` for the fallback when unusable."""
    content_hash: str
    model_text: str
    key: str

    @property
    def usable(self) -> bool:
        return is_usable(self.model_text)


def embedding_task(item_id: str, text: ItemText) -> EmbeddingTask:
    return EmbeddingTask(content_hash(text), embedding_text(text), f"item:{item_id}")


def needs_embedding(record: ItemRecord, new_hash: str, model_name: str) -> bool:
    return (record.embedding is None or record.content_hash != new_hash
            or record.embedding_model != model_name)


def fold_catalog_change(record: ItemRecord, row: ItemRow, text: ItemText | None, lsn: int,
                        model_name: str) -> EmbeddingTask | None:
    """Applies a catalog row (insert, update or snapshot) to `record`. Returns the embedding task
    when the vector is due, None when the stored vector still matches the text. `updated_lsn`
    moves only when something a watcher sees changed, so a no-op update sends nothing.
    `text` None means the text is not known (left out of the delta and gone from the catalog):
    the stored text fields and vector are kept."""
    task = embedding_task(record.item_id, text) if text is not None else None
    due = task is not None and needs_embedding(record, task.content_hash, model_name)
    visible_before = (record.in_catalog, record.active, record.title, record.category, record.brand,
                      record.price, record.currency)
    record.in_catalog = True
    record.active = row.active
    if text is not None:
        record.title, record.category, record.brand = text.title, text.category, text.brand
    record.price, record.currency = row.price, row.currency
    visible_after = (record.in_catalog, record.active, record.title, record.category, record.brand,
                     record.price, record.currency)
    if due or visible_after != visible_before:
        record.updated_lsn = lsn
    return task if due else None


def set_embedding(record: ItemRecord, task: EmbeddingTask, vector: bytes, model_name: str,
                  fallback: bool) -> None:
    record.content_hash = task.content_hash
    record.embedding = vector
    record.embedding_model = model_name
    record.fallback_embedding = fallback


def fold_removal(record: ItemRecord, lsn: int) -> bool:
    """Takes a deleted item out of the catalog; the row stays as a tombstone for watchers (and
    keeps its vector: re-adding the same text later costs no model call). False if it was not
    in the catalog."""
    if not record.in_catalog:
        return False
    record.in_catalog = False
    record.active = False
    record.updated_lsn = lsn
    return True
