"""The pgoutput decoder on real replication output from the real test cluster: a table with
many column types, its own publication and slot, changes made by SQL, messages read with a
psycopg2 replication connection and decoded by services.collector.cdc.pgoutput. The same rows
read through the exported-snapshot path must type exactly like the stream's."""
from __future__ import annotations

import select
import time

import psycopg2
import psycopg2.extras
import pytest

from services.collector.cdc.buffer import TransactionBuffer
from services.collector.cdc.pgoutput import Begin, Commit, Decoder, Insert, Relation, Truncate
from services.collector.cdc.reader import ReplicationReader
from services.collector.cdc.slots import default_slot_prefix, libpq_dsn
from services.collector.cdc.snapshot import Snapshot
from services.common.delta_consumer import row_of

TABLE_SQL = """
CREATE TABLE cdc_types (
    id        integer PRIMARY KEY,
    small     smallint,
    big       bigint,
    amount    numeric(18, 9),
    ratio     real,
    score     double precision,
    flag      boolean,
    label     text,
    code      char(3),
    name      varchar(40),
    at        timestamptz,
    local_at  timestamp,
    day       date,
    span      interval,
    doc       jsonb,
    raw_doc   json,
    nums      integer[],
    words     text[],
    uid       uuid,
    blob      bytea,
    big_text  text
);
CREATE PUBLICATION cdc_types_pub FOR TABLE cdc_types;
"""

ROW1 = """
INSERT INTO cdc_types VALUES (
    1, -7, 9007199254740993, 12.5, 1.5, 'NaN', true, 'crème "brûlée"', 'EU', 'n',
    '2024-05-01 14:30:00.123456+02', '2024-05-01 12:30:00', '2024-05-01', '1 day 2 hours',
    '{"a": [1, 2.5, null], "b": {"c": "d"}}', '{"x": 1}', '{1,NULL,3}', '{"a b","c,d",NULL}',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff10', NULL)
"""


@pytest.fixture(scope="module")
def capture(database_url):
    """Makes the changes and returns (decoded messages, dsn, slot prefix)."""
    dsn = libpq_dsn(database_url, application_name="test-cdc-pgoutput")
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    slot = default_slot_prefix(database_url) + "decoder_test"
    with admin.cursor() as cursor:
        cursor.execute(TABLE_SQL)
    replication = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    cursor = replication.cursor()
    cursor.create_replication_slot(slot, output_plugin="pgoutput")
    with admin.cursor() as sql:
        sql.execute(ROW1)
        # An incompressible value > TOAST_TUPLE_THRESHOLD is stored out of line ...
        sql.execute("INSERT INTO cdc_types (id, big_text) VALUES (2, (SELECT string_agg(md5(i::text), '') "
                    "FROM generate_series(1, 400) i))")
        # ... and is not sent again when an update leaves it unchanged.
        sql.execute("UPDATE cdc_types SET label = 'toast kept' WHERE id = 2")
        sql.execute("UPDATE cdc_types SET id = 3 WHERE id = 2")                 # key change
        sql.execute("BEGIN; INSERT INTO cdc_types (id) VALUES (10); INSERT INTO cdc_types (id) VALUES (11); "
                    "DELETE FROM cdc_types WHERE id = 10; COMMIT")
        sql.execute("DELETE FROM cdc_types WHERE id = 3")
        sql.execute("UPDATE cdc_types SET amount = NULL, flag = false WHERE id = 1")
        sql.execute("INSERT INTO cdc_types (id) VALUES (20)")
        sql.execute("TRUNCATE cdc_types RESTART IDENTITY")
        sql.execute(ROW1)
        sql.execute("SELECT pg_current_wal_lsn()::text")
    cursor.start_replication(slot_name=slot, decode=False,
                             options={"proto_version": "1", "publication_names": "cdc_types_pub"})
    messages, commits, deadline = [], 0, time.monotonic() + 30
    while commits < 10 and time.monotonic() < deadline:
        message = cursor.read_message()
        if message is None:
            select.select([cursor], [], [], 0.5)
            continue
        messages.append((message.data_start, bytes(message.payload)))
        if message.payload[:1] == b"C":
            commits += 1
    replication.close()
    yield messages, dsn, default_slot_prefix(database_url)
    with admin.cursor() as sql:
        sql.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                    (slot,))
        sql.execute("DROP PUBLICATION cdc_types_pub; DROP TABLE cdc_types")
    admin.close()


def decode_all(messages):
    decoder, transactions, current = Decoder(), [], None
    for lsn, payload in messages:
        message, changes = decoder.feed(payload, lsn)
        if isinstance(message, Begin):
            current = {"begin": message, "changes": [], "messages": []}
        elif isinstance(message, Commit):
            current["commit"] = message
            transactions.append(current)
            current = None
        else:
            current["messages"].append(message)
            current["changes"].extend(changes)
    return decoder, transactions


EXPECTED_ROW1 = {
    "id": 1, "small": -7, "big": "9007199254740993", "amount": "12.500000000", "ratio": 1.5, "score": "NaN",
    "flag": True, "label": 'crème "brûlée"', "code": "EU ", "name": "n",
    "at": "2024-05-01T12:30:00.123456Z", "local_at": "2024-05-01T12:30:00", "day": "2024-05-01",
    "span": "P1DT2H", "doc": {"a": [1, 2.5, None], "b": {"c": "d"}}, "raw_doc": {"x": 1},
    "nums": [1, None, 3], "words": ["a b", "c,d", None], "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "blob": "AP8Q", "big_text": None,
}


def test_real_messages_decode_with_types(capture):
    messages, _, _ = capture
    decoder, transactions = decode_all(messages)
    assert len(transactions) == 10
    for transaction in transactions:
        begin, commit = transaction["begin"], transaction["commit"]
        assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
        assert begin.commit_time_us == commit.commit_time_us
        assert all(change.lsn < commit.end_lsn for change in transaction["changes"])
    assert [t["commit"].end_lsn for t in transactions] == sorted(t["commit"].end_lsn for t in transactions)
    relation = next(m for m in transactions[0]["messages"] if isinstance(m, Relation))
    assert relation.qualified_name == "cdc_types" and relation.replica_identity == "d"
    assert [c.name for c in relation.columns if c.key] == ["id"]
    assert {c.name: c.type_oid for c in relation.columns}["amount"] == 1700

    (insert,) = transactions[0]["changes"]
    assert insert.op == "insert" and insert.table == "cdc_types" and insert.key == {"id": 1}
    assert insert.new_row == EXPECTED_ROW1

    toast_insert = transactions[1]["changes"][0]
    assert len(toast_insert.new_row["big_text"]) == 400 * 32
    (toast_update,) = transactions[2]["changes"]
    assert toast_update.op == "update" and toast_update.unchanged_toast_columns == ["big_text"]
    assert "big_text" not in toast_update.new_row and toast_update.new_row["label"] == "toast kept"
    assert toast_update.old_key is None

    (key_change,) = transactions[3]["changes"]
    assert key_change.op == "update" and key_change.key == {"id": 3} and key_change.old_key == {"id": 2}

    multi = transactions[4]["changes"]
    assert [(c.op, c.key) for c in multi] == [("insert", {"id": 10}), ("insert", {"id": 11}), ("delete", {"id": 10})]
    assert multi[2].old_key == {"id": 10} and multi[2].new_row is None
    assert len({transactions[4]["begin"].xid}) == 1

    (delete,) = transactions[5]["changes"]
    assert delete.op == "delete" and delete.key == {"id": 3}

    (nulls,) = transactions[6]["changes"]
    assert nulls.new_row["amount"] is None and nulls.new_row["flag"] is False

    (truncate,) = transactions[8]["changes"]
    assert truncate.op == "truncate" and truncate.table == "cdc_types"
    assert any(isinstance(m, Truncate) and m.restart_identity for m in transactions[8]["messages"])
    assert transactions[9]["changes"][0].new_row == EXPECTED_ROW1
    assert isinstance(next(m for m in transactions[9]["messages"] if isinstance(m, Insert)), Insert)


def test_snapshot_rows_type_exactly_like_stream_rows(capture):
    """The exported-snapshot path (Snapshot, through the reader's CREATE_REPLICATION_SLOT) gives
    the same JSON values as pgoutput for the same row."""
    _, dsn, prefix = capture
    reader = ReplicationReader(dsn, prefix + "decoder_snap", "cdc_types_pub", ["cdc_types"], TransactionBuffer(10))
    reader.connect()
    try:
        consistent_lsn, snapshot_name = reader.create_slot()
        snapshot = Snapshot(dsn, snapshot_name, ["cdc_types"], consistent_lsn, 10)
        try:
            (batch,) = list(snapshot.read())
        finally:
            snapshot.close()
    finally:
        reader.stop()
        admin = psycopg2.connect(dsn)
        admin.autocommit = True
        with admin.cursor() as sql:
            sql.execute("SELECT pg_drop_replication_slot(%s)", (prefix + "decoder_snap",))
        admin.close()
    assert batch.snapshot and batch.snapshot_begin and batch.snapshot_end and batch.commit_lsn == consistent_lsn
    (delta,) = batch.deltas
    assert delta.lsn == consistent_lsn and row_of(delta.key) == {"id": 1}
    expected = dict(EXPECTED_ROW1)
    row = row_of(delta.new_row)
    # Struct numbers are doubles: the only lossy step is the transport, for small ints none.
    assert row == expected
