"""Argument checks shared by the ranker's requests: each failure is INVALID_ARGUMENT naming the field."""
from __future__ import annotations

from services.common import validation
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
    return validation.check_id(name, value, required=required)


def check_query(query: str) -> str:
    return validation.check_text("query", query, MAX_QUERY_BYTES, required=True)
