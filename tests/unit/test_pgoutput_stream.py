"""From decoded transactions to the stream: the bounded buffer, batching, slot naming and the
DeltaConsumer's helpers. No Postgres, no gRPC."""
from __future__ import annotations

import threading
import time

import pytest
from google.protobuf import struct_pb2

from deltarec.v1 import collector_pb2
from services.collector.cdc.buffer import BufferClosed, Transaction, TransactionBuffer
from services.collector.cdc.convert import batch_of
from services.collector.cdc.pgoutput import RowChange
from services.collector.cdc.slots import default_slot_prefix, slot_name_for
from services.common.delta_consumer import DeltaConsumer, row_of


def txn(lsn: int, size: int, xid: int = 1) -> Transaction:
    return Transaction(xid, lsn, 757_382_400_000_000,
                       [RowChange(lsn - 10 + i, "items", "insert", {"item_id": f"i{i}"}, {"item_id": f"i{i}", "n": i})
                        for i in range(size)])


def test_buffer_is_bounded_by_deltas_and_admits_one_large_transaction_alone():
    buffer = TransactionBuffer(10)
    assert buffer.put(txn(100, 6), timeout=0)
    assert not buffer.put(txn(200, 6), timeout=0.05)        # 12 > 10: must wait
    assert buffer.size == 6
    assert buffer.take(100, timeout=0)[0].commit_lsn == 100
    assert buffer.put(txn(300, 25), timeout=0)               # empty: admitted although > capacity
    assert not buffer.put(txn(400, 1), timeout=0.01)
    assert [t.commit_lsn for t in buffer.take(5, timeout=0)] == [300]   # whole, never split


def test_take_packs_whole_transactions_up_to_the_batch_size():
    buffer = TransactionBuffer(1000)
    for lsn, size in [(1, 2), (2, 2), (3, 2), (4, 5)]:
        buffer.put(txn(lsn, size))
    assert [t.commit_lsn for t in buffer.take(5, timeout=0)] == [1, 2]   # 2+2; +2 would be 6
    assert [t.commit_lsn for t in buffer.take(5, timeout=0)] == [3]      # 2; +5 would be 7
    assert [t.commit_lsn for t in buffer.take(5, timeout=0)] == [4]
    assert buffer.take(5, timeout=0.01) == []


def test_a_blocked_put_resumes_when_the_consumer_takes():
    buffer = TransactionBuffer(4)
    buffer.put(txn(1, 4))
    done = threading.Event()

    def producer():
        buffer.put(txn(2, 4))
        done.set()
    threading.Thread(target=producer, daemon=True).start()
    assert not done.wait(0.1)
    buffer.take(10, timeout=0)
    assert done.wait(2)


def test_close_with_error_reraises_to_the_taker_and_unblocks_the_putter():
    buffer = TransactionBuffer(1)
    buffer.put(txn(1, 1))
    buffer.close(RuntimeError("connection lost"))
    with pytest.raises(RuntimeError, match="connection lost"):
        buffer.take(10, timeout=0)
    with pytest.raises(BufferClosed):
        buffer.put(txn(2, 1), timeout=0)
    clean = TransactionBuffer(1)
    clean.close()
    with pytest.raises(BufferClosed):
        clean.take(10, timeout=0)


def test_batch_of_keeps_transactions_whole_and_acks_the_last_commit():
    first = txn(1000, 2, xid=7)
    second = Transaction(8, 2000, 757_382_400_500_000, [
        RowChange(1500, "items", "update", {"item_id": "b"}, {"item_id": "b", "price": "1.5"}, {"item_id": "a"},
                  ["description"]),
        RowChange(1600, "items", "delete", {"item_id": "c"}, None, {"item_id": "c"}),
        RowChange(1700, "events", "truncate")])
    batch = batch_of([first, second])
    assert batch.commit_lsn == 2000 and not batch.snapshot
    assert [d.xid for d in batch.deltas] == [7, 7, 8, 8, 8]
    assert [d.op for d in batch.deltas] == [collector_pb2.OPERATION_INSERT] * 2 + [
        collector_pb2.OPERATION_UPDATE, collector_pb2.OPERATION_DELETE, collector_pb2.OPERATION_TRUNCATE]
    update, delete, truncate = batch.deltas[2:]
    assert row_of(update.key) == {"item_id": "b"} and row_of(update.old_key) == {"item_id": "a"}
    assert list(update.unchanged_toast_columns) == ["description"]
    assert not delete.HasField("new_row") and row_of(delete.old_key) == {"item_id": "c"}
    assert truncate.table == "events" and not truncate.HasField("key")
    assert update.commit_time.ToJsonString() == "2024-01-01T00:00:00.500Z"
    assert batch.deltas[0].commit_time.ToJsonString() == "2024-01-01T00:00:00Z"


def test_row_of_gives_plain_json_values():
    struct = struct_pb2.Struct()
    struct.update({"id": 12, "price": "1.50", "flag": True, "none": None, "attrs": {"a": [1, 2.5]}, "big": 2.0 ** 60})
    assert row_of(struct) == {"id": 12, "price": "1.50", "flag": True, "none": None, "attrs": {"a": [1, 2.5]},
                              "big": 2.0 ** 60}
    assert isinstance(row_of(struct)["id"], int)


def test_slot_names_are_per_database_and_fit_postgres_limits():
    assert default_slot_prefix("postgresql+psycopg2://u@h:5/deltarec") == "deltarec_deltarec_"
    assert default_slot_prefix("postgresql+psycopg2://u@h:5/T-1") == "deltarec_t_1_"
    assert slot_name_for("deltarec_db_", "features") == "deltarec_db_features"
    long_name = slot_name_for("deltarec_" + "x" * 40 + "_", "g" * 41)
    assert len(long_name) == 63
    assert long_name != slot_name_for("deltarec_" + "x" * 40 + "_", "g" * 40 + "h")


def test_delta_consumer_accepts_several_addresses_and_stops_without_a_server():
    consumer = DeltaConsumer("127.0.0.1:1, 127.0.0.1:2", "g", lambda batch: None, reconnect_backoff_s=0.05)
    assert consumer.addresses == ["127.0.0.1:1", "127.0.0.1:2"]
    consumer.start()
    time.sleep(0.5)
    assert not consumer.connected.is_set() and consumer.reconnects >= 1
    started = time.monotonic()
    consumer.stop(timeout_s=5)
    assert time.monotonic() - started < 5
    with pytest.raises(ValueError):
        DeltaConsumer(" ", "g", lambda batch: None)
