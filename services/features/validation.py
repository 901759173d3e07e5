"""Request limits of the features API: pure checks that raise InvalidArgument naming the field."""
from __future__ import annotations

from typing import Sequence

from services.common.errors import InvalidArgument

MAX_ID_BYTES = 128
MAX_ITEM_IDS = 1000
MAX_USER_IDS = 1000
DEFAULT_WATCH_USERS_BATCH = 1024
MAX_WATCH_USERS_BATCH = 8192
MAX_RESYNC_IDS = 10_000
MAX_TEXTS = 256
MAX_TEXT_BYTES = 2048
DEFAULT_WATCH_BATCH = 256
MAX_WATCH_BATCH = 4096


def check_id(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(f"{field}: required")
    size = len(value.encode())
    if size > MAX_ID_BYTES:
        raise InvalidArgument(f"{field}: {size} bytes, more than {MAX_ID_BYTES}")
    return value


def check_ids(field: str, values: Sequence[str], limit: int, *, allow_empty: bool = False) -> list[str]:
    """The ids, each once, in request order."""
    if not values and not allow_empty:
        raise InvalidArgument(f"{field}: must not be empty")
    if len(values) > limit:
        raise InvalidArgument(f"{field}: {len(values)} entries, more than the limit of {limit}")
    for position, value in enumerate(values):
        check_id(f"{field}[{position}]", value)
    return list(dict.fromkeys(values))


def check_texts(texts: Sequence[str]) -> list[str]:
    if not texts:
        raise InvalidArgument("texts: must not be empty")
    if len(texts) > MAX_TEXTS:
        raise InvalidArgument(f"texts: {len(texts)} entries, more than the limit of {MAX_TEXTS}")
    for position, text in enumerate(texts):
        size = len(text.encode())
        if size > MAX_TEXT_BYTES:
            raise InvalidArgument(f"texts[{position}]: {size} bytes, more than {MAX_TEXT_BYTES}")
        if not text.strip():
            raise InvalidArgument(f"texts[{position}]: must not be blank")
    return list(texts)


def watch_batch_size(requested: int) -> int:
    if requested == 0:
        return DEFAULT_WATCH_BATCH
    if requested > MAX_WATCH_BATCH:
        raise InvalidArgument(f"max_batch_size: {requested}, more than {MAX_WATCH_BATCH}")
    return requested


def watch_users_batch_size(requested: int) -> int:
    if requested == 0:
        return DEFAULT_WATCH_USERS_BATCH
    if requested > MAX_WATCH_USERS_BATCH:
        raise InvalidArgument(f"max_batch_size: {requested}, more than {MAX_WATCH_USERS_BATCH}")
    return int(requested)
