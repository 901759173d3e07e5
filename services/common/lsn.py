"""Postgres WAL positions (LSNs): 64-bit integers on the wire, 'X/Y' text in SQL."""
from __future__ import annotations


def parse_lsn(text: str | None) -> int:
    if not text:
        return 0
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
