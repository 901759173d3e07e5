"""Defect 1 in process: a store error while (re)connecting must never end the delta consumer, and
a consumer that cannot make progress turns the service's health NOT_SERVING, then SERVING again
by itself. A fake collector (a real gRPC server) sends one batch per subscription and heartbeats."""
from __future__ import annotations

import threading
import time

import grpc
import psycopg2
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deltarec.v1 import collector_pb2, collector_pb2_grpc
from services.common.delta_consumer import DeltaConsumer
from services.common.readiness import Readiness
from services.common.server import GrpcService

SERVICE = "deltarec.v1.CollectorService"


class FakeCollector(collector_pb2_grpc.CollectorServiceServicer):
    def __init__(self) -> None:
        self.subscriptions = 0
        self.next_lsn = 100

    def Subscribe(self, request_iterator, context):
        next(request_iterator)
        self.subscriptions += 1
        self.next_lsn += 1
        yield collector_pb2.SubscribeResponse(batch=collector_pb2.DeltaBatch(commit_lsn=self.next_lsn))
        while context.is_active():
            yield collector_pb2.SubscribeResponse(heartbeat=collector_pb2.Heartbeat(server_lsn=self.next_lsn))
            time.sleep(0.05)


def wait_for(predicate, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def collector():
    fake = FakeCollector()
    service = GrpcService("fake-collector", [SERVICE], port=0, metrics_port=None)
    collector_pb2_grpc.add_CollectorServiceServicer_to_server(fake, service.server)
    service.start()
    yield fake, f"127.0.0.1:{service.port}"
    service.stop(0)


def test_store_errors_while_reconnecting_are_retried_and_health_follows_progress(collector):
    fake, address = collector
    store_down = threading.Event()
    applied: list[int] = []

    def resume_lsn() -> int:        # as features does: SELECT applied_lsn ... at each (re)connect
        if store_down.is_set():
            raise psycopg2.OperationalError("connection to server failed: Connection refused")
        return applied[-1] if applied else 0

    def apply_batch(batch) -> None:
        if store_down.is_set():
            raise psycopg2.OperationalError("server closed the connection unexpectedly")
        applied.append(batch.commit_lsn)

    consumer = DeltaConsumer(address, "features", apply_batch, resume_lsn=resume_lsn,
                             reconnect_backoff_s=0.05)
    service = GrpcService("consumer-test", ["deltarec.test.Consumer"], port=0, metrics_port=None)
    service.start()
    service.set_ready()
    readiness = Readiness(service, interval_s=0.05).add("delta stream",
                                                        lambda: consumer.progress_problem(0.5))
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    health = health_pb2_grpc.HealthStub(channel)

    def status() -> int:
        return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status

    try:
        consumer.start()
        readiness.start()
        wait_for(lambda: applied, "the first batch")
        assert consumer.progress_problem(0.5) is None and status() == health_pb2.HealthCheckResponse.SERVING

        # The outage: the stream breaks (as when Postgres stops under the collector) and the
        # store refuses both the resume position and the batch.
        store_down.set()
        before = consumer.reconnects
        consumer._cancel_call()
        wait_for(lambda: consumer.reconnects > before + 3, "reconnect attempts during the outage")
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, "health NOT_SERVING")
        assert "delta stream of features" in readiness.problems["delta stream"]
        assert consumer._thread.is_alive() and consumer.error is None   # never ended

        # Postgres is back: the consumer resumes by itself and health returns to SERVING.
        store_down.clear()
        count = len(applied)
        wait_for(lambda: len(applied) > count, "a batch applied after the outage")
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, "health SERVING again")
        assert consumer.progress_problem(0.5) is None
    finally:
        readiness.stop()
        consumer.stop()
        channel.close()
        service.stop(0)


def test_an_apply_longer_than_the_idle_timeout_is_not_an_idle_stream(collector):
    """The stream is idle when no message comes, not while a batch is being applied: an apply
    that outlasts idle_timeout_s (MiniLM embedding a batch on loaded cores) keeps the stream,
    and its ack, instead of reconnecting after every such batch."""
    fake, address = collector
    applied: list[int] = []

    def slow_apply(batch) -> None:
        time.sleep(1.2)
        applied.append(batch.commit_lsn)

    consumer = DeltaConsumer(address, "features", slow_apply, resume_lsn=lambda: applied[-1] if applied else 0,
                             reconnect_backoff_s=0.05, idle_timeout_s=0.4)
    consumer.start()
    try:
        wait_for(lambda: applied, "the slow batch to be applied")
        time.sleep(0.6)     # heartbeats flow again: more than the idle timeout, no reconnect
        assert consumer.reconnects == 0
        assert fake.subscriptions == 1
        assert consumer.last_acked_lsn == applied[0]
    finally:
        consumer.stop()
