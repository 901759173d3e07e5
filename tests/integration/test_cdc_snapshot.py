"""The initial snapshot: read in the slot's exported snapshot while writers run, then the
stream from the consistent point (no gap, no double effect); and a snapshot interrupted by a
collector crash is started over."""
from __future__ import annotations

import random
import threading
import time

from scripts.infra import free_port
from services.common.delta_consumer import DeltaConsumer, row_of
from tests.integration.cdc_support import (RawStream, StateConsumer, collector_env, group_info, sql_connection,
                                           table_state)
from tests.support import wait_until

POPULATE = """
INSERT INTO items (item_id, title, price, currency)
SELECT 'p' || n, 'title ' || n, n * 0.5, 'EUR' FROM generate_series(1, %(items)s) n;
INSERT INTO events (event_id, event_type, user_id, item_id, occurred_at)
SELECT 'pe' || n, 'view', 'u' || (n %% 50), 'p' || (1 + n %% %(items)s), now() FROM generate_series(1, %(events)s) n;
"""


class MixedWriter(threading.Thread):
    """Updates, inserts, deletes items and inserts events, each in its own transaction."""

    def __init__(self, database_url: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.connection = sql_connection(database_url)
        self.random = random.Random(seed)
        self.seed = seed
        self.stop_event = threading.Event()
        self.commits = 0

    def run(self) -> None:
        n = 0
        with self.connection.cursor() as cursor:
            while not self.stop_event.is_set():
                n += 1
                choice = self.random.random()
                target = f"p{self.random.randint(1, 3000)}"
                if choice < 0.4:
                    cursor.execute("UPDATE items SET title = %s, price = %s WHERE item_id = %s",
                                   (f"w{self.seed}-{n}", self.random.randint(1, 10_000) / 100, target))
                elif choice < 0.6:
                    cursor.execute("INSERT INTO items (item_id, title, price) VALUES (%s, 'new', 1) "
                                   "ON CONFLICT (item_id) DO UPDATE SET title = 'renewed'", (f"n{self.seed}-{n}",))
                elif choice < 0.75:
                    cursor.execute("DELETE FROM items WHERE item_id = %s", (target,))
                elif choice < 0.8:
                    cursor.execute("UPDATE items SET item_id = %s WHERE item_id = %s", (f"k{self.seed}-{n}", target))
                else:
                    cursor.execute("INSERT INTO events (event_id, event_type, user_id, item_id, occurred_at) "
                                   "VALUES (%s, 'click', 'u', %s, now())", (f"we{self.seed}-{n}", target))
                self.commits += 1
                time.sleep(0.002)


def test_snapshot_while_writers_run_ends_equal_to_the_tables(start_service, service_env, database_url):
    sql = sql_connection(database_url)
    with sql.cursor() as cursor:
        cursor.execute(POPULATE, {"items": 3000, "events": 2000})
    writers = [MixedWriter(database_url, seed) for seed in (1, 2)]
    for writer in writers:
        writer.start()
    time.sleep(0.3)
    collector = start_service("services.collector", collector_env(service_env))
    state = StateConsumer(delay_s=0.005)
    during_snapshot = {}

    def apply(batch):
        if batch.snapshot_begin:
            during_snapshot["start"] = sum(w.commits for w in writers)
        state.apply(batch)
        if batch.snapshot_end:
            during_snapshot["end"] = sum(w.commits for w in writers)
    consumer = DeltaConsumer(collector.address, "snap", apply, max_batch_size=100).start()
    try:
        wait_until(lambda: "end" in during_snapshot, timeout_s=60, what="the snapshot")
        time.sleep(1.0)
        for writer in writers:
            writer.stop_event.set()
            writer.join(10)
        wait_until(lambda: state.state() == table_state(sql), timeout_s=60,
                   what="the consumer's state to equal the tables")
    finally:
        consumer.stop()
        for writer in writers:
            writer.stop_event.set()
    assert during_snapshot["end"] - during_snapshot["start"] > 20     # writers did run meanwhile
    snapshot = [b for b in state.batches if b.snapshot]
    stream = [b for b in state.batches if not b.snapshot]
    assert len(snapshot) >= 50 and state.snapshot_starts == 1
    consistent = snapshot[-1].commit_lsn
    assert [b.commit_lsn for b in snapshot] == list(range(consistent - len(snapshot) + 1, consistent + 1))
    assert all(d.lsn == consistent for b in snapshot for d in b.deltas)
    assert stream and all(b.commit_lsn > consistent for b in stream)
    assert max(state.event_applications.values()) == 1


def test_a_snapshot_interrupted_by_a_crash_is_started_over(start_service, service_env, database_url):
    sql = sql_connection(database_url)
    with sql.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM items WHERE item_id LIKE 'p%%'")
        if cursor.fetchone()[0] == 0:
            cursor.execute(POPULATE, {"items": 3000, "events": 2000})
    env = collector_env(service_env, GRPC_PORT=str(free_port()))
    collector = start_service("services.collector", env, name="collector-1")
    first = RawStream(collector.address, "partial", max_batch_size=200)
    batches = [first.next_batch(), first.next_batch()]
    assert batches[0].snapshot_begin and not batches[1].snapshot_end
    first.ack(batches[0].commit_lsn)
    time.sleep(0.3)
    collector.kill()                                  # kill -9 in the middle of the snapshot
    first.close()
    old_consistent_lsn = batches[0].commit_lsn        # <= the old consistent point
    with sql.cursor() as cursor:
        cursor.execute("DELETE FROM items WHERE item_id IN (SELECT item_id FROM items ORDER BY item_id LIMIT 50)")
        cursor.execute("INSERT INTO items (item_id, title) SELECT 'after' || n, 'a' FROM generate_series(1, 10) n")

    collector = start_service("services.collector", env, name="collector-2")
    info = group_info(collector, "partial")
    assert info is not None and not info.snapshot_done and info.slot_exists

    second = RawStream(collector.address, "partial", max_batch_size=200)
    snapshot = second.snapshot()
    assert snapshot[0].snapshot_begin and snapshot[-1].snapshot_end
    assert all(b.snapshot for b in snapshot) and not any(b.snapshot_begin for b in snapshot[1:])
    new_consistent_lsn = snapshot[-1].commit_lsn
    assert new_consistent_lsn > old_consistent_lsn
    items = {row_of(d.key)["item_id"]: row_of(d.new_row)["title"] for b in snapshot for d in b.deltas
             if d.table == "items"}
    events = {row_of(d.new_row)["event_id"] for b in snapshot for d in b.deltas if d.table == "events"}
    expected_items, expected_events = table_state(sql)
    assert items == {key: title for key, (title, _) in expected_items.items()}
    assert events == expected_events
    for batch in snapshot:
        second.ack(batch.commit_lsn)
    wait_until(lambda: group_info(collector, "partial").snapshot_done, what="the snapshot's end to be recorded")
    info = group_info(collector, "partial")
    assert info.consistent_lsn == new_consistent_lsn
    with sql.cursor() as cursor:
        cursor.execute("INSERT INTO items (item_id, title) VALUES ('streamed', 's')")
    streamed = second.next_batch()
    assert not streamed.snapshot and streamed.commit_lsn > new_consistent_lsn
    assert [row_of(d.key)["item_id"] for d in streamed.deltas] == ["streamed"]
    second.ack(streamed.commit_lsn)
    second.close()
