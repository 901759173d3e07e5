"""Request limits of the features API (the checks themselves: services/common/validation.py)."""
from __future__ import annotations

from typing import Sequence

from services.common.validation import MAX_INT64, MAX_UINT32, check_id, check_ids, check_int, check_texts as _texts

__all__ = ["check_id", "check_ids", "check_texts", "watch_batch_size", "watch_users_batch_size",
           "after_lsn", "max_history"]

MAX_ITEM_IDS = 1000
MAX_USER_IDS = 1000
DEFAULT_WATCH_USERS_BATCH = 1024
MAX_WATCH_USERS_BATCH = 8192
MAX_RESYNC_IDS = 10_000
MAX_TEXTS = 256
MAX_TEXT_BYTES = 2048
DEFAULT_WATCH_BATCH = 256
MAX_WATCH_BATCH = 4096


def check_texts(texts: Sequence[str]) -> list[str]:
    return _texts("texts", texts, MAX_TEXTS, MAX_TEXT_BYTES, allow_empty=False, required=True)


def watch_batch_size(requested: int) -> int:
    return check_int("max_batch_size", requested, 1, MAX_WATCH_BATCH, default=DEFAULT_WATCH_BATCH)


def watch_users_batch_size(requested: int) -> int:
    return check_int("max_batch_size", requested, 1, MAX_WATCH_USERS_BATCH, default=DEFAULT_WATCH_USERS_BATCH)


def after_lsn(value: int) -> int:
    return check_int("after_lsn", value, 0, MAX_INT64)


def max_history(value: int) -> int:
    """0 = the whole stored history; any uint32 is meaningful (a cut)."""
    return check_int("max_history", value, 0, MAX_UINT32)
