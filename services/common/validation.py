"""Field checks for every gRPC edge, written once.

Each service validates the ids, strings and numbers of a request here, at its edge, before any
core code runs, so that a bad value is answered with INVALID_ARGUMENT naming the field instead of
failing deep inside (Postgres refuses NUL in text, torch refuses seeds >= 2**32, a bigint column
refuses 2**64-1, ...). The rules:

- **ids** (user, item, event, consumer group, ...): non-empty unless optional, at most
  `MAX_ID_BYTES` bytes of UTF-8, no control character (C0, DEL, C1) at all;
- **free text** (titles, descriptions, queries, attribute values): bounded in bytes, no NUL;
  tabs, newlines and other printable oddities are content and are kept;
- **lists**: bounded in length; ids in a list are checked one by one (`field[3]: ...`);
- **numbers**: a documented closed range; doubles must be finite;
- **messages**: a reason never quotes the caller's input unbounded (`quote`), and every status
  message is cut to `MAX_STATUS_MESSAGE` characters by the error mapping (errors.py), so a 1 MB
  value never comes back in a status or overflows the trailer size limit.

Invalid UTF-8 in a string field never reaches this module: protobuf refuses to parse such a
message, and the shared interceptor answers INVALID_ARGUMENT for unparsable requests.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, Sequence

from services.common.errors import MAX_STATUS_MESSAGE, InvalidArgument, bounded  # noqa: F401 - re-exported

MAX_ID_BYTES = 128
# Postgres bigint: every LSN, version and counter column.
MAX_INT64 = 2 ** 63 - 1
MAX_UINT32 = 2 ** 32 - 1

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def quote(value: object, limit: int = 48) -> str:
    """repr() of a caller's value, cut to about `limit` characters: safe inside a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def text_problem(value: str, max_bytes: int, *, required: bool = False, identifier: bool = False) -> str | None:
    """What is wrong with `value` (no field name), or None. The building block of the raising
    checks below, for edges that report per entry instead of failing the call (the collector's
    per-event rejections)."""
    if not value or value.isspace():
        return "required" if required else None
    # A character is at most 4 bytes in UTF-8: short strings need no encoding to be measured.
    if len(value) * 4 > max_bytes:
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            return f"{size} bytes, more than {max_bytes}"
    if identifier:
        found = _CONTROL.search(value)
        if found:
            if found.group() == "\x00":
                return "contains a NUL character"
            return f"contains a control character (U+{ord(found.group()):04X})"
    elif "\x00" in value:
        return "contains a NUL character"
    return None


def check_text(field: str, value: str, max_bytes: int, *, required: bool = False) -> str:
    problem = text_problem(value, max_bytes, required=required)
    if problem:
        raise InvalidArgument(f"{field}: {problem}")
    return value


def check_id(field: str, value: str, *, required: bool = True, max_bytes: int = MAX_ID_BYTES) -> str:
    problem = text_problem(value, max_bytes, required=required, identifier=True)
    if problem:
        raise InvalidArgument(f"{field}: {problem}")
    return value


def check_count(field: str, count: int, limit: int, *, allow_empty: bool = True) -> None:
    if not count and not allow_empty:
        raise InvalidArgument(f"{field}: must not be empty")
    if count > limit:
        raise InvalidArgument(f"{field}: {count} entries, more than the limit of {limit}")


def check_ids(field: str, values: Sequence[str], limit: int, *, allow_empty: bool = False,
              max_bytes: int = MAX_ID_BYTES) -> list[str]:
    """The ids, each once, in request order."""
    check_count(field, len(values), limit, allow_empty=allow_empty)
    values = list(values)
    for position, value in enumerate(values):
        check_id(f"{field}[{position}]", value, max_bytes=max_bytes)
    return list(dict.fromkeys(values))


def check_texts(field: str, values: Sequence[str], limit: int, max_bytes: int, *,
                allow_empty: bool = True, required: bool = False) -> list[str]:
    check_count(field, len(values), limit, allow_empty=allow_empty)
    values = list(values)
    for position, value in enumerate(values):
        check_text(f"{field}[{position}]", value, max_bytes, required=required)
    return values


def check_int(field: str, value: int, low: int, high: int, *, default: int | None = None) -> int:
    """`value` within [low, high]; 0 means `default` when one is given (proto3's unset)."""
    if value == 0 and default is not None:
        return default
    if not low <= value <= high:
        raise InvalidArgument(f"{field}: {value} is outside {low}..{high}")
    return int(value)


def check_number(field: str, value: float, low: float, high: float) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{field}: must be a finite number")
    if not low <= value <= high:
        raise InvalidArgument(f"{field}: {value:g} is outside {low:g}..{high:g}")
    return float(value)


def check_choice(field: str, value: str, choices: Iterable[str]) -> str:
    options = list(choices)
    if value not in options:
        raise InvalidArgument(f"{field}: {quote(value)} is not one of {', '.join(map(repr, options))}")
    return value


def check_enum(field: str, value: int, names: Mapping[int, str]) -> int:
    """A proto enum value the code knows (unknown numbers parse fine in proto3)."""
    if value not in names:
        raise InvalidArgument(f"{field}: unknown value {int(value)}")
    return value
