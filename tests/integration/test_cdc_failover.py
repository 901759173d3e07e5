"""Crashes: kill -9 of the collector mid-stream, and two collectors for one group (one streams,
the other stands by and takes over when the first dies)."""
from __future__ import annotations

import threading
import time
import uuid

from scripts.infra import free_port
from services.common.delta_consumer import DeltaConsumer
from tests.integration.cdc_support import StateConsumer, collector_env, group_info, sql_connection, table_state
from tests.support import wait_until


class EventWriter:
    """Plain-SQL writer (any writer, not only the collector's API): small transactions of 1-3
    events at a steady pace; remembers what committed."""

    def __init__(self, database_url: str, per_second: float = 150.0) -> None:
        self.connection = sql_connection(database_url)
        self.interval = 1.0 / per_second
        self.committed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "EventWriter":
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        with self.connection.cursor() as cursor:
            while not self._stop.is_set():
                ids = [f"w{uuid.uuid4().hex[:12]}" for _ in range(1 + n % 3)]
                cursor.execute("INSERT INTO events (event_id, event_type, user_id, item_id, occurred_at) "
                               "SELECT id, 'view', 'u', 'i', now() FROM unnest(%s::text[]) id", (ids,))
                self.committed.extend(ids)      # autocommit: committed once execute returned
                n += 1
                self._stop.wait(self.interval)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(10)
        return self.committed


def test_kill_9_mid_stream_and_restart_loses_nothing_and_applies_nothing_twice(
        start_service, service_env, database_url):
    port = free_port()
    env = collector_env(service_env, GRPC_PORT=str(port))
    collector = start_service("services.collector", env, name="collector-1")
    # Two groups: one consumer tells the collector its high-water mark when it reconnects
    # (resume_lsn), the other does not (the collector then re-sends one transaction per batch).
    state, told = StateConsumer(), StateConsumer()
    killed = threading.Event()

    def apply_then_crash(batch):
        state.apply(batch)
        # Applied, and now the collector dies before the ack reaches it: this batch and those
        # after it are bound to come again.
        if not killed.is_set() and any(delta.new_row["event_id"] == "marker" for delta in batch.deltas
                                       if delta.table == "events"):
            collector.kill()                           # kill -9, mid-stream
            killed.set()
    consumers = [
        DeltaConsumer(collector.address, "crash", apply_then_crash, max_batch_size=50, reconnect_backoff_s=0.2),
        DeltaConsumer(collector.address, "crash_told", told.apply, max_batch_size=50, reconnect_backoff_s=0.2,
                      resume_lsn=lambda: told.mark)]
    for consumer in consumers:
        consumer.start()
    wait_until(lambda: all(consumer.last_acked_lsn > 0 for consumer in consumers), what="the snapshots")
    writer = EventWriter(database_url).start()
    wait_until(lambda: min(len(state.events), len(told.events)) >= 100, what="deltas to flow")
    with sql_connection(database_url).cursor() as cursor:
        cursor.execute("INSERT INTO events (event_id, event_type, user_id, item_id, occurred_at) "
                       "VALUES ('marker', 'view', 'u', 'i', now())")
    assert killed.wait(20)
    applied_before_restart = len(state.events)
    time.sleep(1.0)                                    # writers keep committing meanwhile
    start_service("services.collector", env, name="collector-2")
    wait_until(lambda: consumers[0].connected.is_set() and len(state.events) > applied_before_restart + 50,
               what="the consumer to resume on the restarted collector")
    committed = writer.stop()
    sql = sql_connection(database_url)
    for each in (state, told):
        wait_until(lambda: each.state()[1] == table_state(sql)[1], timeout_s=30,
                   what="every committed event to be applied")
    for consumer in consumers:
        consumer.stop()
    for each, consumer in ((state, consumers[0]), (told, consumers[1])):
        assert set(committed) <= each.state()[1]
        # No double effect: every event applied exactly once; repeats (deltas sent again because
        # their ack had not reached the slot) were absorbed by the high-water mark.
        assert max(each.event_applications.values()) == 1
        assert consumer.reconnects >= 1 and each.snapshot_starts == 1
        lsns = [batch.commit_lsn for batch in each.batches]
        assert lsns == sorted(set(lsns))
    # The batch applied just before the crash came again, and the high-water mark absorbed it;
    # the consumer that said where it was got nothing twice.
    assert state.skipped_batches >= 1
    assert told.skipped_batches == 0


def test_two_collectors_one_streams_a_group_the_other_takes_over_when_it_dies(
        start_service, service_env, database_url):
    collector_a = start_service("services.collector", collector_env(service_env, COLLECTOR_ID="collector-a"),
                                name="collector-a")
    collector_b = start_service("services.collector", collector_env(service_env, COLLECTOR_ID="collector-b"),
                                name="collector-b")
    shared = StateConsumer()          # two replicas of one consumer service, one store
    on_a = DeltaConsumer(collector_a.address, "ha", shared.apply, reconnect_backoff_s=0.2).start()
    wait_until(lambda: on_a.connected.is_set() and on_a.last_acked_lsn > 0, what="the stream on collector A")
    b_batches: list = []

    def apply_on_b(batch):
        b_batches.append(batch)
        shared.apply(batch)
    on_b = DeltaConsumer(collector_b.address, "ha", apply_on_b, reconnect_backoff_s=0.2).start()
    wait_until(on_b.standby.is_set, what="collector B to stand by")
    assert not on_b.connected.is_set()

    writer = EventWriter(database_url, per_second=50).start()
    wait_until(lambda: len(shared.events) >= 20, what="deltas through collector A")
    assert b_batches == []                             # only one collector streams the group
    info = group_info(collector_b, "ha")
    assert info.holder == "collector-a" and info.active

    collector_a.kill()                                 # kill -9 the holder
    killed_at = time.monotonic()
    on_a.stop()
    wait_until(on_b.connected.is_set, timeout_s=20, what="collector B to take over")
    takeover_s = time.monotonic() - killed_at
    count = len(shared.events)
    wait_until(lambda: len(shared.events) >= count + 20, what="deltas through collector B")
    writer.stop()
    sql = sql_connection(database_url)
    wait_until(lambda: shared.state()[1] == table_state(sql)[1], timeout_s=30,
               what="collector B to deliver everything")
    on_b.stop()
    assert b_batches and max(shared.event_applications.values()) == 1
    assert group_info(collector_b, "ha").holder in ("", "collector-b")
    assert takeover_s < 15, takeover_s                # lease TTL 2 s


def test_a_consumer_given_both_collectors_follows_the_group_when_one_stops(
        start_service, service_env, database_url):
    """Graceful shutdown ends the streams at once (UNAVAILABLE) and releases the slot's lease, so
    a consumer that lists both collectors is streaming from the other one right away."""
    collector_a = start_service("services.collector", collector_env(service_env, COLLECTOR_ID="collector-a"),
                                name="collector-a")
    collector_b = start_service("services.collector", collector_env(service_env, COLLECTOR_ID="collector-b"),
                                name="collector-b")
    state = StateConsumer()
    consumer = DeltaConsumer(f"{collector_a.address},{collector_b.address}", "follow", state.apply,
                             reconnect_backoff_s=0.1).start()
    try:
        wait_until(lambda: consumer.connected.is_set() and consumer.last_acked_lsn > 0, what="the stream")
        first = group_info(collector_a, "follow").holder
        (stopping, other) = (collector_a, collector_b) if first == "collector-a" else (collector_b, collector_a)
        started = time.monotonic()
        assert stopping.stop() == 0
        assert time.monotonic() - started < 5            # not held for the grace period
        sql = sql_connection(database_url)
        with sql.cursor() as cursor:
            cursor.execute("INSERT INTO events (event_id, event_type, user_id, item_id, occurred_at) "
                           "VALUES ('after-stop', 'view', 'u', 'i', now())")
        wait_until(lambda: "after-stop" in state.events, timeout_s=10, what="the event through the other collector")
        assert group_info(other, "follow").holder == other.env["COLLECTOR_ID"]
    finally:
        consumer.stop()
