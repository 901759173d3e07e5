"""The pgoutput decoder and value typing, on hand-built protocol bytes.

(tests/integration/test_cdc_pgoutput.py runs the same decoder on real replication output.)
"""
from __future__ import annotations

import struct
from datetime import datetime, timezone

import pytest

from services.collector.cdc import pgoutput, values
from services.collector.cdc.pgoutput import (UNCHANGED_TOAST, Begin, Column, Commit, Decoder, Delete, Insert,
                                             LogicalMessage, Origin, ProtocolError, Relation, Truncate, Type,
                                             Update, decode_message)


# ---------------------------------------------------------------------------- builders
def s(text: str) -> bytes:
    return text.encode() + b"\x00"


def tuple_data(*columns) -> bytes:
    out = struct.pack(">h", len(columns))
    for column in columns:
        if column is None:
            out += b"n"
        elif column is UNCHANGED_TOAST:
            out += b"u"
        else:
            raw = column.encode() if isinstance(column, str) else column
            out += b"t" + struct.pack(">i", len(raw)) + raw
    return out


def begin(final_lsn: int, ts: int, xid: int) -> bytes:
    return b"B" + struct.pack(">QqI", final_lsn, ts, xid)


def commit(commit_lsn: int, end_lsn: int, ts: int) -> bytes:
    return b"C" + struct.pack(">BQQq", 0, commit_lsn, end_lsn, ts)


def relation(oid: int, namespace: str, name: str, identity: str, columns) -> bytes:
    out = b"R" + struct.pack(">I", oid) + s(namespace) + s(name) + identity.encode() + struct.pack(">h", len(columns))
    for key, column_name, type_oid, typmod in columns:
        out += struct.pack(">B", 1 if key else 0) + s(column_name) + struct.pack(">Ii", type_oid, typmod)
    return out


ITEMS_COLUMNS = [(True, "item_id", 25, -1), (False, "price", 1700, 1179661), (False, "attributes", 3802, -1),
                 (False, "active", 16, -1), (False, "updated_at", 1184, -1), (False, "description", 25, -1),
                 (False, "tags", 1009, -1), (False, "n", 20, -1)]


def items_relation(oid: int = 16384) -> bytes:
    return relation(oid, "public", "items", "d", ITEMS_COLUMNS)


# ---------------------------------------------------------------------------- messages
def test_begin_and_commit():
    message = decode_message(begin(0x1_0000_00A0, 757_382_400_000_000, 4242))
    assert message == Begin(0x1_0000_00A0, 757_382_400_000_000, 4242)
    assert message.commit_time == datetime(2024, 1, 1, tzinfo=timezone.utc)
    message = decode_message(commit(0x10A0, 0x10D8, 757_382_400_000_001))
    assert message == Commit(0, 0x10A0, 0x10D8, 757_382_400_000_001)
    assert message.end_lsn == 0x10D8


def test_relation_and_type_and_origin():
    message = decode_message(items_relation())
    assert isinstance(message, Relation)
    assert message.oid == 16384 and message.qualified_name == "items" and message.replica_identity == "d"
    assert message.columns[0] == Column("item_id", 25, -1, True)
    assert [c.key for c in message.columns] == [True] + [False] * 7
    other = decode_message(relation(5, "shop", "orders", "f", [(True, "id", 23, -1)]))
    assert other.qualified_name == "shop.orders"
    assert decode_message(b"Y" + struct.pack(">I", 70000) + s("public") + s("mood")) == Type(70000, "public", "mood")
    assert decode_message(b"O" + struct.pack(">Q", 99) + s("upstream")) == Origin(99, "upstream")


def test_insert_update_delete_truncate_message():
    insert = decode_message(b"I" + struct.pack(">I", 7) + b"N" + tuple_data("a", None, UNCHANGED_TOAST))
    assert insert == Insert(7, ("a", None, UNCHANGED_TOAST))
    update = decode_message(b"U" + struct.pack(">I", 7) + b"K" + tuple_data("old", None) + b"N" + tuple_data("new", "x"))
    assert update == Update(7, "K", ("old", None), ("new", "x"))
    plain_update = decode_message(b"U" + struct.pack(">I", 7) + b"N" + tuple_data("k", "v"))
    assert plain_update.old_kind is None and plain_update.old is None
    delete = decode_message(b"D" + struct.pack(">I", 7) + b"K" + tuple_data("k", None))
    assert delete == Delete(7, "K", ("k", None))
    truncate = decode_message(b"T" + struct.pack(">ib", 2, 3) + struct.pack(">II", 7, 8))
    assert truncate == Truncate(3, (7, 8)) and truncate.cascade and truncate.restart_identity
    message = decode_message(b"M" + struct.pack(">bQ", 1, 1234) + s("app") + struct.pack(">i", 3) + b"xyz")
    assert message == LogicalMessage(True, 1234, "app", b"xyz")


def test_utf8_values_and_lengths_in_bytes():
    text = "crème brûlée — 東京"
    message = decode_message(b"I" + struct.pack(">I", 1) + b"N" + tuple_data(text, ""))
    assert message.new == (text, "")


@pytest.mark.parametrize("payload", [
    b"",
    b"B" + b"\x00" * 5,                                            # short Begin
    b"I" + struct.pack(">I", 1) + b"X",                             # bad marker
    b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"t" + struct.pack(">i", 10) + b"abc",
    b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"z",  # unknown column kind
    b"R" + struct.pack(">I", 1) + b"public",                          # unterminated string
    b"Z",                                                            # unknown message
    b"D" + struct.pack(">I", 1) + b"N" + tuple_data("k"),            # delete needs K or O
])
def test_malformed_messages_are_protocol_errors(payload):
    with pytest.raises(ProtocolError):
        decode_message(payload)


# ---------------------------------------------------------------------------- decoder (typed rows)
def row_bytes(item_id="i1", price="12.500000000", attributes='{"a": [1, 2.5, null], "b": {"c": "d"}}',
              active="t", updated_at="2024-05-01 12:30:00.123456+00", description="text",
              tags='{red,"dark blue",NULL,"q\\"uote"}', n="9007199254740993"):
    return tuple_data(item_id, price, attributes, active, updated_at, description, tags, n)


def test_decoder_types_an_insert():
    decoder = Decoder()
    _, changes = decoder.feed(items_relation())
    assert changes == []
    _, changes = decoder.feed(b"I" + struct.pack(">I", 16384) + b"N" + row_bytes(), lsn=500)
    (change,) = changes
    assert change.op == "insert" and change.table == "items" and change.lsn == 500
    assert change.key == {"item_id": "i1"}
    assert change.new_row == {
        "item_id": "i1", "price": "12.500000000", "attributes": {"a": [1, 2.5, None], "b": {"c": "d"}},
        "active": True, "updated_at": "2024-05-01T12:30:00.123456Z", "description": "text",
        "tags": ["red", "dark blue", None, 'q"uote'], "n": "9007199254740993"}
    assert change.old_key is None and change.unchanged_toast_columns == []


def test_decoder_update_with_unchanged_toast_and_key_change():
    decoder = Decoder()
    decoder.feed(items_relation())
    new = tuple_data("i2", "1.000000000", "{}", "f", "2024-05-01 12:30:00+00", UNCHANGED_TOAST, None, "1")
    old_key = tuple_data("i1", None, None, None, None, None, None, None)
    _, (change,) = decoder.feed(b"U" + struct.pack(">I", 16384) + b"K" + old_key + b"N" + new)
    assert change.op == "update" and change.key == {"item_id": "i2"} and change.old_key == {"item_id": "i1"}
    assert "description" not in change.new_row and change.unchanged_toast_columns == ["description"]
    assert change.new_row["active"] is False and change.new_row["tags"] is None and change.new_row["n"] == 1


def test_decoder_update_full_identity_reports_the_old_key_only_when_it_changed():
    # REPLICA IDENTITY FULL (a table without a primary key): every column is part of the key,
    # and the old row comes with every update.
    decoder = Decoder()
    decoder.feed(relation(9, "public", "t", "f", [(True, "id", 23, -1), (True, "v", 25, -1)]))
    _, (change,) = decoder.feed(b"U" + struct.pack(">I", 9) + b"O" + tuple_data("1", "a") + b"N" + tuple_data("1", "b"))
    assert change.old_key == {"id": 1, "v": "a"} and change.key == {"id": 1, "v": "b"}
    _, (same,) = decoder.feed(b"U" + struct.pack(">I", 9) + b"O" + tuple_data("1", "a") + b"N" + tuple_data("1", "a"))
    assert same.old_key is None


def test_decoder_delete_and_truncate():
    decoder = Decoder()
    decoder.feed(items_relation())
    decoder.feed(relation(16390, "public", "events", "d", [(True, "id", 20, -1)]))
    old = tuple_data("i9", None, None, None, None, None, None, None)
    _, (change,) = decoder.feed(b"D" + struct.pack(">I", 16384) + b"K" + old, lsn=7)
    assert change.op == "delete" and change.key == {"item_id": "i9"} == change.old_key and change.new_row is None
    _, changes = decoder.feed(b"T" + struct.pack(">ib", 2, 0) + struct.pack(">II", 16384, 16390))
    assert [(c.op, c.table) for c in changes] == [("truncate", "items"), ("truncate", "events")]


def test_decoder_relation_change_replaces_the_cached_one():
    decoder = Decoder()
    decoder.feed(relation(9, "public", "t", "d", [(True, "id", 23, -1)]))
    decoder.feed(relation(9, "public", "t", "d", [(True, "id", 23, -1), (False, "extra", 1700, -1)]))
    _, (change,) = decoder.feed(b"I" + struct.pack(">I", 9) + b"N" + tuple_data("5", "0.1"))
    assert change.new_row == {"id": 5, "extra": "0.1"}


def test_decoder_change_before_relation_and_column_mismatch():
    decoder = Decoder()
    with pytest.raises(ProtocolError, match="before its Relation"):
        decoder.feed(b"I" + struct.pack(">I", 1) + b"N" + tuple_data("x"))
    decoder.feed(relation(1, "public", "t", "d", [(True, "id", 23, -1)]))
    with pytest.raises(ProtocolError, match="columns"):
        decoder.feed(b"I" + struct.pack(">I", 1) + b"N" + tuple_data("1", "2"))


# ---------------------------------------------------------------------------- values
@pytest.mark.parametrize("oid, text, expected", [
    (16, "t", True), (16, "f", False), (16, "true", True),
    (21, "-3", -3), (23, "2147483647", 2147483647),
    (20, "9007199254740991", 9007199254740991), (20, "-9007199254740991", -9007199254740991),
    (20, "9007199254740992", "9007199254740992"), (20, "-9223372036854775808", "-9223372036854775808"),
    (700, "1.5", 1.5), (701, "0.1", 0.1), (701, "NaN", "NaN"), (701, "Infinity", "Infinity"),
    (701, "-Infinity", "-Infinity"),
    (1700, "12.500000000", "12.500000000"), (1700, "NaN", "NaN"), (1700, "-0.000000001", "-0.000000001"),
    (25, "hello", "hello"), (1042, "EU ", "EU "), (2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                                                   "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    (1184, "2024-05-01 12:30:00+00", "2024-05-01T12:30:00Z"),
    (1184, "2024-05-01 12:30:00.5+05:30", "2024-05-01T12:30:00.5+05:30"),
    (1184, "2024-05-01 12:30:00-08", "2024-05-01T12:30:00-08:00"),
    (1184, "infinity", "infinity"), (1184, "-infinity", "-infinity"),
    (1184, "0044-03-15 12:00:00+00 BC", "0044-03-15T12:00:00Z BC"),
    (1114, "2024-05-01 12:30:00.000001", "2024-05-01T12:30:00.000001"),
    (1082, "2024-05-01", "2024-05-01"), (1186, "P1DT2H", "P1DT2H"),
    (114, '{"a": 1}', {"a": 1}), (3802, "[1, \"x\", null, true]", [1, "x", None, True]), (3802, "3", 3),
    (17, "\\x00ff10", "AP8Q"), (17, "\\x", ""),
    (1007, "{1,2,NULL}", [1, 2, None]), (1007, "{}", []), (1007, "{{1,2},{3,4}}", [[1, 2], [3, 4]]),
    (1007, "[0:1]={7,8}", [7, 8]), (1009, '{"a,b","c\\\\d",""}', ["a,b", "c\\d", ""]),
    (1009, '{NULL,"NULL"}', [None, "NULL"]), (1231, "{1.5,NaN}", ["1.5", "NaN"]),
    (1185, '{"2024-05-01 12:30:00+00"}', ["2024-05-01T12:30:00Z"]),
    (3807, '{"{\\"a\\": 1}"}', [{"a": 1}]), (1000, "{t,f}", [True, False]),
    (99999, "user type value", "user type value"),
])
def test_convert(oid, text, expected):
    assert values.convert(oid, text) == expected


def test_convert_null():
    assert values.convert(23, None) is None


def test_libpq_options_name_every_session_setting():
    options = values.libpq_options()
    for key in values.SESSION_SETTINGS:
        assert f"-c {key}=" in options
    assert " " not in values.SESSION_SETTINGS["DateStyle"].replace(" ", "") and "DateStyle=ISO,YMD" in options


def test_pg_time():
    assert pgoutput.pg_time(0) == datetime(2000, 1, 1, tzinfo=timezone.utc)


def test_row_table_names_the_table_of_a_row_message_without_decoding_it():
    decoder = Decoder()
    insert = b"I" + struct.pack(">I", 16384) + b"N" + tuple_data("i1")
    assert decoder.row_table(insert) is None                  # relation not announced yet: decode (and fail) as before
    decoder.feed(items_relation(16384))
    assert decoder.row_table(insert) == "items"
    assert decoder.row_table(b"D" + struct.pack(">I", 16384) + b"K" + tuple_data("i1")) == "items"
    assert decoder.row_table(begin(1, 2, 3)) is None          # not a row message
    assert decoder.row_table(b"I\x00") is None
