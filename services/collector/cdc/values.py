"""Postgres text-format values -> JSON-compatible Python values, by type OID.

pgoutput (protocol v1) sends every column in the type's *text* output format, and the initial
snapshot reads every column as `col::text`, so one function, `convert(type_oid, text)`, gives the
stream and the snapshot the same typing. The session that produces the text must use the
settings in `SESSION_SETTINGS` (ISO dates, UTC, ISO 8601 intervals, shortest exact floats):
both the replication connection and the snapshot connection are opened with them.

Encoding (the contract of `Delta.new_row` / `key` / `old_key`, see collector.proto):

- smallint, integer, oid               -> number
- bigint                               -> number when |v| <= 2**53 - 1 (exact in a double, and in
                                          JavaScript), else a decimal string. Identity/serial
                                          columns never get near that in practice; a consumer that
                                          must be exact calls int() on either form.
- real, double precision               -> number; NaN / Infinity / -Infinity as those strings
- numeric                              -> decimal string exactly as Postgres prints it ("12.500000000",
                                          "NaN", "Infinity")
- boolean                              -> true / false
- text, varchar, char(n), name, uuid,
  citext and unknown/user types        -> string (char(n) keeps its padding, as Postgres prints it)
- timestamptz                          -> RFC 3339 in UTC: "2024-05-01T12:30:00.123456Z"
- timestamp (without time zone)        -> "2024-05-01T12:30:00.123456" (no offset: there is none)
- date, time, timetz, interval         -> ISO 8601 strings ("2024-05-01", "12:30:00", "P1DT2H")
- +-infinity timestamps/dates          -> "infinity" / "-infinity"
- json, jsonb                          -> the parsed value (object, list, ...)
- bytea                                -> base64 string
- arrays of any of the above           -> (nested) lists, NULL elements as null
- NULL                                 -> null
"""
from __future__ import annotations

import base64
import json
import math
from typing import Any, Callable

# Connection settings under which the text formats above hold.
SESSION_SETTINGS = {
    "DateStyle": "ISO, YMD",
    "TimeZone": "UTC",
    "IntervalStyle": "iso_8601",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}


def libpq_options() -> str:
    """The `options` connection parameter that applies SESSION_SETTINGS."""
    return " ".join(f"-c {key}={value.replace(' ', '')}" for key, value in SESSION_SETTINGS.items())


MAX_SAFE_INTEGER = 2 ** 53 - 1


def _int(text: str) -> int:
    return int(text)


def _bigint(text: str) -> int | str:
    value = int(text)
    return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else text


def _float(text: str) -> float | str:
    value = float(text)
    return value if math.isfinite(value) else text


def _bool(text: str) -> bool:
    return text in ("t", "true")


def _text(text: str) -> str:
    return text


def _json(text: str) -> Any:
    return json.loads(text)


def _bytea(text: str) -> str:
    if text.startswith("\\x"):
        return base64.b64encode(bytes.fromhex(text[2:])).decode()
    # escape format (bytea_output=escape): decode octal escapes
    out, i = bytearray(), 0
    raw = text.encode()
    while i < len(raw):
        if raw[i] == 0x5C and raw[i + 1:i + 2] == b"\\":
            out.append(0x5C)
            i += 2
        elif raw[i] == 0x5C:
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return base64.b64encode(bytes(out)).decode()


def _offset(text: str) -> tuple[str, str]:
    """Splits '... 12:00:00.5+05:30' into ('... 12:00:00.5', '+05:30'), normalising the
    offset to RFC 3339 ('+05' -> '+05:00', '+00' -> 'Z', seconds in an offset are dropped)."""
    for position in range(len(text) - 1, 9, -1):
        if text[position] in "+-":
            body, offset = text[:position], text[position:]
            parts = offset[1:].split(":")
            hours = parts[0]
            minutes = parts[1] if len(parts) > 1 else "00"
            if hours == "00" and minutes == "00":
                return body, "Z"
            return body, f"{offset[0]}{hours}:{minutes}"
    return text, ""


def _timestamptz(text: str) -> str:
    if text in ("infinity", "-infinity"):
        return text
    bc = text.endswith(" BC")
    if bc:
        text = text[:-3]
    body, offset = _offset(text)
    result = body.replace(" ", "T", 1) + offset
    return result + " BC" if bc else result


def _timestamp(text: str) -> str:
    if text in ("infinity", "-infinity"):
        return text
    return text.replace(" ", "T", 1)


_CONVERTERS: dict[int, Callable[[str], Any]] = {
    16: _bool,          # bool
    17: _bytea,         # bytea
    18: _text,          # "char"
    19: _text,          # name
    20: _bigint,        # int8
    21: _int,           # int2
    23: _int,           # int4
    25: _text,          # text
    26: _int,           # oid
    28: _int,           # xid
    114: _json,         # json
    142: _text,         # xml
    700: _float,        # float4
    701: _float,        # float8
    790: _text,         # money (locale-formatted: keep as printed)
    1042: _text,        # bpchar
    1043: _text,        # varchar
    1082: _text,        # date
    1083: _text,        # time
    1114: _timestamp,   # timestamp
    1184: _timestamptz,  # timestamptz
    1186: _text,        # interval
    1266: _text,        # timetz
    1700: _text,        # numeric
    2950: _text,        # uuid
    3802: _json,        # jsonb
    3220: _text,        # pg_lsn
    5069: _bigint,      # xid8
}

# Array type OID -> element type OID (built-in types; user-defined arrays arrive through a
# pgoutput Type message and are registered with `register_array_type`).
ARRAY_ELEMENTS: dict[int, int] = {
    1000: 16, 1001: 17, 1002: 18, 1003: 19, 1016: 20, 1005: 21, 1007: 23, 1009: 25, 1028: 26,
    199: 114, 143: 142, 1021: 700, 1022: 701, 1014: 1042, 1015: 1043, 1182: 1082, 1183: 1083,
    1115: 1114, 1185: 1184, 1187: 1186, 1270: 1266, 1231: 1700, 2951: 2950, 3807: 3802,
    271: 5069, 1011: 28,
}


def register_array_type(array_oid: int, element_oid: int) -> None:
    ARRAY_ELEMENTS[array_oid] = element_oid


def convert(type_oid: int, text: str | None) -> Any:
    """The JSON-compatible value of one column given in Postgres text format (None = NULL)."""
    if text is None:
        return None
    converter = _CONVERTERS.get(type_oid)
    if converter is not None:
        return converter(text)
    element = ARRAY_ELEMENTS.get(type_oid)
    if element is not None:
        return parse_array(text, element)
    return text


def parse_array(text: str, element_oid: int) -> list:
    """Parses a Postgres array literal ('{1,2,NULL}', '{{"a b","c\\"d"},{e,f}}',
    '[0:1]={x,y}') into nested lists of converted elements."""
    if text.startswith("["):
        text = text[text.index("=") + 1:]
    delimiter = ";" if element_oid == 603 else ","   # box is the only built-in type using ';'
    result, position = _parse_array_level(text, 0, element_oid, delimiter)
    return result


def _parse_array_level(text: str, position: int, element_oid: int, delimiter: str) -> tuple[list, int]:
    if text[position] != "{":
        raise ValueError(f"malformed array literal at {position}: {text!r}")
    position += 1
    items: list = []
    if text[position] == "}":
        return items, position + 1
    while True:
        char = text[position]
        if char == "{":
            nested, position = _parse_array_level(text, position, element_oid, delimiter)
            items.append(nested)
        elif char == '"':
            position += 1
            chars = []
            while text[position] != '"':
                if text[position] == "\\":
                    position += 1
                chars.append(text[position])
                position += 1
            position += 1
            items.append(convert(element_oid, "".join(chars)))
        else:
            end = position
            while text[end] not in (delimiter, "}"):
                end += 1
            token = text[position:end].strip()
            items.append(None if token == "NULL" else convert(element_oid, token))
            position = end
        char = text[position]
        if char == delimiter:
            position += 1
            continue
        if char == "}":
            return items, position + 1
        raise ValueError(f"malformed array literal at {position}: {text!r}")
