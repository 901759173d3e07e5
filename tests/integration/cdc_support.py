"""Helpers of the CDC integration tests (test_cdc*.py): an in-memory consumer, a raw Subscribe
stream, the collector's consumer groups and metrics. Helpers every test uses are in tests/support.py."""
from __future__ import annotations

import queue
import threading
import time
import urllib.request

import grpc
import psycopg2

from deltarec.v1 import collector_pb2, collector_pb2_grpc
from services.common.delta_consumer import row_of


def collector_env(service_env: dict, **extra: str) -> dict:
    # The raw test streams read a whole snapshot (batches of 1) before they ack anything: they
    # need more batches in flight than the default (4, sized for consumers that ack as they go).
    env = dict(service_env, COLLECTOR_HEARTBEAT_S="0.3", COLLECTOR_SLOT_LEASE_TTL_S="2",
               COLLECTOR_SLOT_FENCE_S="3", COLLECTOR_MAX_UNACKED_BATCHES="256")
    env.update(extra)
    return env


def sql_connection(database_url: str):
    connection = psycopg2.connect(database_url.replace("postgresql+psycopg2://", "postgresql://"))
    connection.autocommit = True
    return connection


def table_state(connection) -> tuple[dict, set]:
    """What the tables hold: {item_id: (title, price text)}, {event ids}."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT item_id, title, price::text FROM items")
        items = {row[0]: (row[1], row[2]) for row in cursor.fetchall()}
        cursor.execute("SELECT event_id FROM events")
        events = {row[0] for row in cursor.fetchall()}
    return items, events


class StateConsumer:
    """A consumer that applies deltas to in-memory tables the way a real one applies them to its
    store: in one step with an LSN high-water mark, skipping batches at or below it. Several
    DeltaConsumer instances may share one (replicas of one service over one store)."""

    OPS = {collector_pb2.OPERATION_INSERT, collector_pb2.OPERATION_UPDATE, collector_pb2.OPERATION_SNAPSHOT}

    def __init__(self, delay_s: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.delay_s = delay_s
        self.reset()
        self.skipped_batches = 0
        self.snapshot_starts = 0
        self.batches: list[collector_pb2.DeltaBatch] = []

    def reset(self) -> None:
        self.mark = 0
        self.items: dict[str, dict] = {}
        self.events: dict[str, dict] = {}
        self.event_applications: dict[str, int] = {}

    def apply(self, batch: collector_pb2.DeltaBatch) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self.lock:
            if batch.snapshot_begin:
                self.snapshot_starts += 1
                self.reset()
            if batch.commit_lsn <= self.mark:
                self.skipped_batches += 1
                return
            for delta in batch.deltas:
                table = self.items if delta.table == "items" else self.events
                if delta.op in self.OPS:
                    row = row_of(delta.new_row)
                    key = row["item_id"] if delta.table == "items" else row["event_id"]
                    if delta.HasField("old_key") and delta.table == "items":
                        table.pop(row_of(delta.old_key)["item_id"], None)
                    table[key] = row
                    if delta.table == "events" and delta.op != collector_pb2.OPERATION_UPDATE:
                        self.event_applications[key] = self.event_applications.get(key, 0) + 1
                elif delta.op == collector_pb2.OPERATION_DELETE:
                    old = row_of(delta.old_key)
                    if delta.table == "items":
                        table.pop(old["item_id"], None)
                    else:
                        table.pop(next((k for k, v in table.items() if v["id"] == old["id"]), None), None)
                elif delta.op == collector_pb2.OPERATION_TRUNCATE:
                    table.clear()
            self.mark = batch.commit_lsn
            self.batches.append(batch)

    def state(self) -> tuple[dict, set]:
        with self.lock:
            items = {key: (row["title"], row["price"]) for key, row in self.items.items()}
            return items, set(self.events)


class RawStream:
    """A bare Subscribe call: the test decides what to ack and when to hang up."""

    def __init__(self, address: str, group: str, max_batch_size: int = 500, tables=()) -> None:
        self.channel = grpc.insecure_channel(address)
        self.requests: queue.Queue = queue.Queue()
        self.requests.put(collector_pb2.SubscribeRequest(start=collector_pb2.SubscribeStart(
            consumer_group=group, max_batch_size=max_batch_size, tables=list(tables))))
        self.call = collector_pb2_grpc.CollectorServiceStub(self.channel).Subscribe(self._requests())
        self.responses: queue.Queue = queue.Queue()
        self.heartbeats: list[collector_pb2.Heartbeat] = []
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _requests(self):
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for response in self.call:
                if response.WhichOneof("message") == "heartbeat":
                    self.heartbeats.append(response.heartbeat)
                else:
                    self.responses.put(response.batch)
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.ended.set()

    def next_batch(self, timeout_s: float = 20.0) -> collector_pb2.DeltaBatch:
        try:
            return self.responses.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no batch within {timeout_s}s (error: {self.error})") from None

    def no_batch_for(self, seconds: float) -> bool:
        try:
            self.responses.get(timeout=seconds)
            return False
        except queue.Empty:
            return True

    def snapshot(self, timeout_s: float = 20.0) -> list[collector_pb2.DeltaBatch]:
        batches = [self.next_batch(timeout_s)]
        while not batches[-1].snapshot_end:
            batches.append(self.next_batch(timeout_s))
        return batches

    def ack(self, lsn: int) -> None:
        self.requests.put(collector_pb2.SubscribeRequest(ack=collector_pb2.SubscribeAck(lsn=lsn)))

    def close(self) -> None:
        self.call.cancel()
        self.requests.put(None)
        self.ended.wait(5)
        self.channel.close()


def stub(process) -> collector_pb2_grpc.CollectorServiceStub:
    return collector_pb2_grpc.CollectorServiceStub(grpc.insecure_channel(process.address))


def group_info(process, name: str) -> collector_pb2.ConsumerGroup | None:
    response = stub(process).ListConsumerGroups(collector_pb2.ListConsumerGroupsRequest(), timeout=10)
    return next((group for group in response.groups if group.name == name), None)


def metrics_text(process) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(text: str, name: str, group: str) -> float | None:
    prefix = f'{name}{{group="{group}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None
