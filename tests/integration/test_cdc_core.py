"""The delta-stream core without gRPC (services.collector.cdc.hub.CdcHub / subscription.Subscription), on
the real Postgres and etcd: batching rules on resume, in-process standby, table rules, flow
control."""
from __future__ import annotations

import queue
import threading
import time

import pytest

from services.collector.cdc.service import build_hub
from services.collector.config import CollectorConfig
from services.common.config import load
from services.common.db import make_engine
from services.common.delta_consumer import row_of
from services.common.errors import FailedPrecondition, InvalidArgument
from tests.integration.cdc_support import sql_connection
from tests.support import wait_until


@pytest.fixture
def hub(database_url, infra_env, etcd_prefix):
    config = load(CollectorConfig, {"DATABASE_URL": database_url, "ETCD_ENDPOINT": infra_env.etcd_endpoint,
                                    "ETCD_PREFIX": etcd_prefix, "COLLECTOR_HEARTBEAT_S": "0.2",
                                    "COLLECTOR_BUFFER_DELTAS": "50", "COLLECTOR_MAX_UNACKED_BATCHES": "4"})
    engine = make_engine(database_url, pool_size=4)
    hub = build_hub(config, engine, "core-test")
    yield hub
    hub.close()
    engine.dispose()


class CoreStream:
    """Runs Subscription.responses() in a thread, like the gRPC edge does."""

    def __init__(self, hub, group: str, max_batch_size: int = 100, resume_after_lsn: int = 0, tables=()) -> None:
        self.subscription = hub.open(group, tables, max_batch_size, resume_after_lsn)
        self.batches: queue.Queue = queue.Queue()
        self.heartbeats: list = []
        self.error: Exception | None = None
        self.ended = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for response in self.subscription.responses():
                if response.WhichOneof("message") == "batch":
                    self.batches.put(response.batch)
                else:
                    self.heartbeats.append(response.heartbeat)
        except Exception as error:  # noqa: BLE001
            self.error = error
        finally:
            self.subscription.close()        # as the gRPC edge does
            self.ended.set()

    def next(self, timeout_s: float = 15.0):
        return self.batches.get(timeout=timeout_s)

    def drain_snapshot(self):
        while True:
            batch = self.next()
            self.subscription.ack(batch.commit_lsn)
            if batch.snapshot_end:
                return batch

    def close(self) -> None:
        self.subscription.cancel("test done", by_server=False)
        self.ended.wait(10)
        self.subscription.close()


def insert_items(connection, *ids: str) -> None:
    with connection.cursor() as cursor:
        for item_id in ids:
            cursor.execute("INSERT INTO items (item_id, title) VALUES (%s, 't')", (item_id,))


def ids_of(batch) -> list[str]:
    return [row_of(delta.key)["item_id"] for delta in batch.deltas]


def test_after_a_reconnect_batches_never_mix_old_and_new_transactions(hub, database_url):
    sql = sql_connection(database_url)
    first = CoreStream(hub, "mix", tables=["items"])
    first.drain_snapshot()
    insert_items(sql, "m1", "m2", "m3")
    seen = []
    while len(seen) < 3:
        seen += ids_of(first.next())
    first.close()                           # nothing acked since the snapshot
    insert_items(sql, "m4", "m5")

    # The consumer does not say where it is: everything committed before the subscription comes
    # one transaction per batch, so a batch-level high-water mark stays exact.
    second = CoreStream(hub, "mix", tables=["items"])
    batches = [second.next() for _ in range(4)]
    second.subscription.ack(batches[0].commit_lsn)     # (at most 4 unacked batches in flight)
    batches.append(second.next())
    assert [ids_of(batch) for batch in batches] == [["m1"], ["m2"], ["m3"], ["m4"], ["m5"]]
    second.close()

    # The consumer says it applied up to m2's commit: m1 and m2 are not sent again, and the
    # rest may be packed (how much depends on what the reader has decoded when a batch is cut).
    third = CoreStream(hub, "mix", tables=["items"], resume_after_lsn=batches[1].commit_lsn)
    rest = [third.next()]
    while rest[-1].commit_lsn < batches[4].commit_lsn:
        rest.append(third.next())
    assert [item for batch in rest for item in ids_of(batch)] == ["m3", "m4", "m5"]
    third.subscription.ack(rest[-1].commit_lsn)
    third.close()
    # Acked: nothing comes again.
    fourth = CoreStream(hub, "mix", tables=["items"])
    with pytest.raises(queue.Empty):
        fourth.next(timeout_s=1.0)
    fourth.close()


def test_one_stream_per_group_in_a_process_the_second_stands_by(hub, database_url):
    first = CoreStream(hub, "solo", tables=["items"])
    first.drain_snapshot()
    second = CoreStream(hub, "solo", tables=["items"])
    wait_until(lambda: any(h.standby for h in second.heartbeats), what="a standby heartbeat")
    assert all(h.holder == "core-test" for h in second.heartbeats if h.standby)
    assert second.batches.empty()
    insert_items(sql_connection(database_url), "solo1")
    assert ids_of(first.next()) == ["solo1"]
    first.close()                                    # unacked: the second gets it
    assert ids_of(second.next()) == ["solo1"]
    second.close()


def test_table_rules(hub):
    with pytest.raises(InvalidArgument):
        hub.open("Bad Name")
    with pytest.raises(InvalidArgument):
        hub.open("fine", ["artifacts"])
    stream = CoreStream(hub, "narrow", tables=["events"])
    snapshot_end = stream.drain_snapshot()
    assert all(delta.table == "events" for delta in snapshot_end.deltas)
    stream.close()
    wider = CoreStream(hub, "narrow", tables=["items", "events"])
    assert wider.ended.wait(10) and isinstance(wider.error, FailedPrecondition)
    assert "drop the group" in str(wider.error)
    wider.subscription.close()


def test_a_slow_consumer_is_bounded_and_slows_only_its_own_stream(hub, database_url):
    sql = sql_connection(database_url)
    slow = CoreStream(hub, "slow", max_batch_size=5, tables=["items"])
    fast = CoreStream(hub, "fast", max_batch_size=500, tables=["items"])
    slow.drain_snapshot()
    fast.drain_snapshot()
    with sql.cursor() as cursor:
        for n in range(300):
            cursor.execute("INSERT INTO items (item_id, title) VALUES (%s, 'f')", (f"flow{n}",))
    fast_ids = []
    while len(fast_ids) < 300:
        batch = fast.next()
        fast_ids += ids_of(batch)
        fast.subscription.ack(batch.commit_lsn)
    # The slow consumer acks nothing: the collector stops at 4 unacked batches and its buffer
    # holds at most 50 deltas; the reader waits; nothing grows without bound.
    time.sleep(1.0)
    assert slow.batches.qsize() == 4 and len(slow.subscription.unacked) == 4
    assert slow.subscription.buffer.size <= 50
    slow_ids = []
    while len(slow_ids) < 300:
        batch = slow.next()
        slow_ids += ids_of(batch)
        slow.subscription.ack(batch.commit_lsn)
    assert slow_ids == fast_ids == [f"flow{n}" for n in range(300)]
    slow.close()
    fast.close()
