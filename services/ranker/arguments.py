"""Argument checks shared by the ranker's requests: each failure is INVALID_ARGUMENT naming the field."""
from __future__ import annotations

from services.common.errors import InvalidArgument

MAX_K = 200
DEFAULT_K = 10
MAX_QUERY_BYTES = 1024


def check_k(k: int) -> int:
    if k == 0:
        return DEFAULT_K
    if not 1 <= k <= MAX_K:
        raise InvalidArgument(f"k: must be in 1..{MAX_K}, got {k}")
    return int(k)


def check_id(name: str, value: str, required: bool = True) -> str:
    if required and not value:
        raise InvalidArgument(f"{name}: required")
    if len(value.encode()) > 128:
        raise InvalidArgument(f"{name}: at most 128 bytes")
    return value


def check_query(query: str) -> str:
    if not 1 <= len(query.encode()) <= MAX_QUERY_BYTES or not query.strip():
        raise InvalidArgument(f"query: must be 1..{MAX_QUERY_BYTES} bytes of text")
    return query
