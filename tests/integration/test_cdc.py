"""The delta stream end to end: a collector process, real Postgres logical replication, real
gRPC, the DeltaConsumer client. Changes made through the collector's API and by plain SQL."""
from __future__ import annotations

import re
import time

import grpc
import pytest
from google.protobuf import timestamp_pb2

from deltarec.v1 import collector_pb2, common_pb2
from services.common.delta_consumer import DeltaConsumer, row_of
from tests.integration.cdc_support import (RawStream, StateConsumer, collector_env, group_info, metric,
                                           metrics_text, sql_connection, stub, table_state)
from tests.support import wait_until, wal_lsn

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")
INSERT, UPDATE, DELETE, SNAPSHOT = (collector_pb2.OPERATION_INSERT, collector_pb2.OPERATION_UPDATE,
                                    collector_pb2.OPERATION_DELETE, collector_pb2.OPERATION_SNAPSHOT)


@pytest.fixture
def collector(start_service, service_env):
    return start_service("services.collector", collector_env(service_env, COLLECTOR_ID="collector-main"))


def test_api_and_sql_changes_arrive_with_values_and_types(collector, database_url, engine):
    sql = sql_connection(database_url)
    with sql.cursor() as cursor:
        cursor.execute("INSERT INTO items (item_id, title, price, currency) VALUES ('pre', 'Before', 3, 'EUR')")
    state = StateConsumer()
    consumer = DeltaConsumer(collector.address, "types", state.apply).start()
    try:
        wait_until(lambda: consumer.last_acked_lsn > 0, what="the initial snapshot")
        (snapshot,) = [b for b in state.batches if b.snapshot]
        assert snapshot.snapshot_begin and snapshot.snapshot_end
        assert [(d.op, row_of(d.key)) for d in snapshot.deltas] == [(SNAPSHOT, {"item_id": "pre"})]
        assert row_of(snapshot.deltas[0].new_row)["price"] == "3.000000000"

        api = stub(collector)
        when = timestamp_pb2.Timestamp()
        when.FromJsonString("2024-05-01T12:30:00.250Z")
        api.UpsertItems(collector_pb2.UpsertItemsRequest(items=[
            common_pb2.Item(item_id="a1", title="Lipstick", description="red", category="makeup", brand="B",
                            price=common_pb2.Money(currency_code="EUR", units=12, nanos=500_000_000),
                            attributes={"color": "red"}, active=True),
            common_pb2.Item(item_id="a2", title="No price", active=False)]), timeout=10)
        api.IngestEvents(collector_pb2.IngestEventsRequest(events=[
            common_pb2.Event(event_id="e1", type=common_pb2.EVENT_TYPE_VIEW, user_id="u1", item_id="a1",
                             timestamp=when, attributes={"src": "home"}),
            common_pb2.Event(event_id="e2", type=common_pb2.EVENT_TYPE_SEARCH, user_id="u1", query="red lips")]),
            timeout=10)
        api.DeleteItems(collector_pb2.DeleteItemsRequest(item_ids=["a2"]), timeout=10)
        with sql.cursor() as cursor:
            cursor.execute("INSERT INTO items (item_id, title, price, currency, attributes, updated_at) VALUES "
                           "('s1', 'SQL item', 0.000000001, 'USD', '{\"n\": 1, \"deep\": {\"l\": [1, 2]}}', "
                           "'2024-05-01 14:30:00.5+02')")
            cursor.execute("UPDATE items SET price = 99999.99, active = false WHERE item_id = 's1'")
            cursor.execute("UPDATE items SET item_id = 's2' WHERE item_id = 's1'")
            cursor.execute("BEGIN; DELETE FROM items WHERE item_id = 'pre'; "
                           "INSERT INTO events (event_id, event_type, user_id, item_id, occurred_at, attributes) "
                           "VALUES ('e3', 'purchase', 'u2', 's2', '2024-05-01 14:30:00+02', '{\"qty\": \"2\"}'); COMMIT")
        end = wal_lsn(engine)
        wait_until(lambda: state.state() == table_state(sql), what="the consumer to match the tables")
        wait_until(lambda: consumer.caught_up_lsn >= end, what="a caught-up heartbeat")
    finally:
        consumer.stop()

    stream = [b for b in state.batches if not b.snapshot]
    lsns = [b.commit_lsn for b in state.batches]
    assert lsns == sorted(set(lsns)) and stream[0].commit_lsn > snapshot.commit_lsn
    deltas = [d for b in stream for d in b.deltas]
    assert [(d.table, d.op, row_of(d.key)) for d in deltas] == [
        ("items", INSERT, {"item_id": "a1"}), ("items", INSERT, {"item_id": "a2"}),
        ("events", INSERT, {"id": 1}), ("events", INSERT, {"id": 2}),
        ("items", DELETE, {"item_id": "a2"}),
        ("items", INSERT, {"item_id": "s1"}), ("items", UPDATE, {"item_id": "s1"}),
        ("items", UPDATE, {"item_id": "s2"}),
        ("items", DELETE, {"item_id": "pre"}), ("events", INSERT, {"id": 3})]
    # One transaction per API call: the two upserted items share an xid (and so a batch).
    assert deltas[0].xid == deltas[1].xid != deltas[2].xid
    upsert_batch = next(b for b in stream if any(row_of(d.key) == {"item_id": "a1"} for d in b.deltas))
    assert any(row_of(d.key) == {"item_id": "a2"} for d in upsert_batch.deltas)
    last_transaction = [d for d in deltas if d.xid == deltas[-1].xid]
    assert len(last_transaction) == 2 and stream[-1].deltas[-1].table == "events"

    a1 = row_of(deltas[0].new_row)
    assert a1 == {**a1, "item_id": "a1", "title": "Lipstick", "description": "red", "category": "makeup",
                  "brand": "B", "price": "12.500000000", "currency": "EUR", "attributes": {"color": "red"},
                  "active": True}
    assert RFC3339_UTC.fullmatch(a1["updated_at"])
    a2 = row_of(deltas[1].new_row)
    assert a2["price"] is None and a2["currency"] is None and a2["active"] is False
    e1, e2 = row_of(deltas[2].new_row), row_of(deltas[3].new_row)
    assert e1["id"] == 1 and isinstance(e1["id"], int) and e1["event_type"] == "view"
    assert e1["occurred_at"] == "2024-05-01T12:30:00.25Z" and e1["attributes"] == {"src": "home"}
    assert e1["query"] is None and e2["query"] == "red lips" and e2["item_id"] is None
    assert row_of(deltas[4].old_key) == {"item_id": "a2"} and not deltas[4].HasField("new_row")
    s1 = row_of(deltas[5].new_row)
    assert s1["price"] == "0.000000001" and s1["updated_at"] == "2024-05-01T12:30:00.5Z"
    assert s1["attributes"] == {"n": 1, "deep": {"l": [1, 2]}}
    update = row_of(deltas[6].new_row)
    assert update["price"] == "99999.990000000" and update["active"] is False
    assert not deltas[6].HasField("old_key")
    assert row_of(deltas[7].old_key) == {"item_id": "s1"} and row_of(deltas[7].new_row)["item_id"] == "s2"
    e3 = row_of(deltas[9].new_row)
    assert e3["occurred_at"] == "2024-05-01T12:30:00Z" and e3["attributes"] == {"qty": "2"}
    for delta in deltas:
        assert delta.lsn > 0 and delta.xid > 0 and delta.commit_time.seconds > 0
        assert delta.lsn < next(b.commit_lsn for b in stream if delta in b.deltas)


def test_unacked_deltas_come_again_after_a_reconnect(collector, database_url):
    sql = sql_connection(database_url)
    first = RawStream(collector.address, "redeliver", max_batch_size=1)
    snapshot = first.snapshot()
    first.ack(snapshot[-1].commit_lsn)
    with sql.cursor() as cursor:
        for n in range(3):
            cursor.execute("INSERT INTO items (item_id, title) VALUES (%s, 'r')", (f"r{n}",))
    batches = [first.next_batch() for _ in range(3)]
    assert [row_of(b.deltas[0].key)["item_id"] for b in batches] == ["r0", "r1", "r2"]
    first.ack(batches[0].commit_lsn)
    wait_until(lambda: group_info(collector, "redeliver").confirmed_flush_lsn >= batches[0].commit_lsn,
               what="the first ack to be confirmed to the slot")
    first.close()        # disconnects with r1, r2 unacked

    second = RawStream(collector.address, "redeliver", max_batch_size=1)
    again = [second.next_batch(), second.next_batch()]
    assert again == batches[1:]                           # the same deltas, same positions
    # An ack between two boundaries is rounded down to the last whole batch it covers.
    second.ack(again[1].commit_lsn - 1)
    wait_until(lambda: group_info(collector, "redeliver").confirmed_flush_lsn >= again[0].commit_lsn,
               what="the rounded ack to be confirmed")
    time.sleep(0.5)
    assert group_info(collector, "redeliver").confirmed_flush_lsn < again[1].commit_lsn
    second.close()

    third = RawStream(collector.address, "redeliver", max_batch_size=1)
    assert third.next_batch() == batches[2]
    third.ack(batches[2].commit_lsn)
    assert third.no_batch_for(1.0)
    wait_until(lambda: any(h.caught_up_lsn >= batches[2].commit_lsn for h in third.heartbeats),
               what="a caught-up heartbeat")
    assert all(h.server_lsn >= batches[2].commit_lsn and not h.standby for h in third.heartbeats)
    third.close()
    text = metrics_text(collector)
    assert metric(text, "deltarec_cdc_redelivered_deltas_total", "redeliver") == 3.0


def test_bad_subscriptions_are_refused(collector):
    bad = RawStream(collector.address, "Bad-Name")
    assert bad.ended.wait(10) and bad.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    unknown = RawStream(collector.address, "fine", tables=["rejected_events"])
    assert unknown.ended.wait(10) and unknown.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not published" in unknown.error.details()
    consumer = DeltaConsumer(collector.address, "Bad-Name", lambda batch: None)
    with pytest.raises(grpc.RpcError):
        consumer.run(__import__("threading").Event())
    assert consumer.error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_admin_lists_and_drops_groups_and_metrics_show_lag(collector, database_url, engine):
    sql = sql_connection(database_url)
    state = StateConsumer()
    consumer = DeltaConsumer(collector.address, "admin_demo", state.apply, tables=["events"]).start()
    try:
        wait_until(lambda: consumer.last_acked_lsn > 0, what="the snapshot")
        with sql.cursor() as cursor:
            cursor.execute("INSERT INTO events (event_id, event_type, user_id, item_id, occurred_at) "
                           "VALUES ('adm1', 'view', 'u', 'x', now())")
            cursor.execute("INSERT INTO items (item_id, title) VALUES ('not-for-events-group', 't')")
        wait_until(lambda: "adm1" in state.events, what="the event")
        live = group_info(collector, "admin_demo")
        assert live.active and live.holder == "collector-main" and live.slot_exists and live.snapshot_done
        assert list(live.tables) == ["events"] and live.slot_name.endswith("_admin_demo")
        assert live.confirmed_flush_lsn >= live.consistent_lsn > 0
        # The items insert is not the group's business; the slot still moves past it.
        end = wal_lsn(engine)
        wait_until(lambda: group_info(collector, "admin_demo").confirmed_flush_lsn >= end,
                   what="the slot to advance while the group's tables are idle")
        assert all(b.deltas[0].table == "events" for b in state.batches if b.deltas)
        text = metrics_text(collector)
        assert metric(text, "deltarec_cdc_deltas_total", "admin_demo") >= 1
        assert metric(text, "deltarec_cdc_active_streams", "admin_demo") == 1
        assert metric(text, "deltarec_cdc_lag_seconds", "admin_demo") is not None
        assert metric(text, "deltarec_cdc_lag_bytes", "admin_demo") is not None
        with pytest.raises(grpc.RpcError) as refused:     # not while a consumer is connected
            stub(collector).DropConsumerGroup(
                collector_pb2.DropConsumerGroupRequest(consumer_group="admin_demo"), timeout=20)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        consumer.stop()
    wait_until(lambda: not group_info(collector, "admin_demo").active, what="the stream to end")
    idle = group_info(collector, "admin_demo")
    assert idle.holder == "" and idle.retained_wal_bytes >= 0

    api = stub(collector)
    assert api.DropConsumerGroup(collector_pb2.DropConsumerGroupRequest(consumer_group="admin_demo"),
                                 timeout=20).dropped
    assert group_info(collector, "admin_demo") is None
    with sql.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (idle.slot_name,))
        assert cursor.fetchone()[0] == 0
    assert not api.DropConsumerGroup(collector_pb2.DropConsumerGroupRequest(consumer_group="admin_demo"),
                                     timeout=20).dropped
