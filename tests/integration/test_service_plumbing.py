"""The plumbing every service shares, exercised for real: health transitions and graceful shutdown
(in-process GrpcService and the collector process under SIGTERM), server reflection through grpcurl,
Prometheus metrics, structured access logs, and UNAVAILABLE while Postgres is down (on a private
Postgres cluster of this test, so the shared test cluster is never stopped)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from deltarec.v1 import collector_pb2, collector_pb2_grpc, common_pb2
from scripts import infra
from services.common import db
from services.common.server import GrpcService
from tests.support import REPO_ROOT, channel_to, count_events, wait_until

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
COLLECTOR_SERVICE = "deltarec.v1.CollectorService"
GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def event(event_id: str, kind: str = "view", item: str = "B00ROSE") -> common_pb2.Event:
    message = common_pb2.Event(event_id=event_id, type=getattr(common_pb2, f"EVENT_TYPE_{kind.upper()}"),
                               user_id="u-plumbing", item_id=item)
    message.timestamp.FromJsonString("2024-03-01T09:30:00Z")
    return message


def request_of(*event_ids: str) -> collector_pb2.IngestEventsRequest:
    return collector_pb2.IngestEventsRequest(events=[event(event_id) for event_id in event_ids])


def blocked_collector_backend(engine) -> bool:
    """True once a collector statement waits on a lock held by this test."""
    with engine.connect() as connection:
        return connection.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'deltarec-collector' "
            "AND state = 'active' AND wait_event_type = 'Lock'")).scalar_one() > 0


def hold_event_id(connection, event_id: str) -> None:
    """Inserts `event_id` in an open transaction: a collector inserting the same id must wait
    until this transaction ends, which keeps its call in flight for as long as the test needs."""
    connection.execute(sa.text(
        "INSERT INTO events (event_id, event_type, user_id, item_id, occurred_at) "
        "VALUES (:id, 'view', 'u-lock', 'B00LOCK', now())"), {"id": event_id})


def log_entries(process) -> list[dict]:
    entries = []
    for line in process.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return entries


# ------------------------------------------------------------------------------ in-process server

def test_health_transitions_and_graceful_shutdown_in_process():
    entered, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow(request: bytes, context) -> bytes:
        entered.set()
        release.wait(60)
        order.append("handler done")
        return b"done:" + request

    service = GrpcService("plumbing-test", ["deltarec.test.Slow"], port=0, metrics_port=None, grace_s=60)
    service.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "deltarec.test.Slow", {"Sleep": grpc.unary_unary_rpc_method_handler(slow)}),))
    service.on_shutdown(lambda: order.append("shutdown hook"))
    service.start()
    stopper = threading.Thread(target=service.stop)
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)

        def check(name: str = "") -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status

        # A watcher sees every transition, as a load balancer would.
        watch = health.Watch(health_pb2.HealthCheckRequest(service="deltarec.test.Slow"), timeout=120)
        assert next(watch).status == NOT_SERVING
        assert check() == NOT_SERVING and check("deltarec.test.Slow") == NOT_SERVING

        service.set_ready()
        assert next(watch).status == SERVING
        assert check() == SERVING and check("deltarec.test.Slow") == SERVING

        in_flight = channel.unary_unary("/deltarec.test.Slow/Sleep").future(b"x", timeout=120)
        assert entered.wait(30)
        stopper.start()
        # Shutdown has begun: NOT_SERVING at once, while the call is still running.
        assert next(watch).status == NOT_SERVING
        assert not in_flight.done()
        watch.cancel()

        release.set()
        assert in_flight.result() == b"done:x"
        stopper.join(60)
        assert not stopper.is_alive()
        # Hooks (e.g. closing the database pool) run only after in-flight calls finished.
        assert order == ["handler done", "shutdown hook"]
        with pytest.raises(grpc.RpcError) as info:
            check()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
        channel.close()
        service.stop(grace_s=0)


# ------------------------------------------------------------------------------ collector process

def test_sigterm_lets_an_in_flight_call_complete_and_the_process_exits_0(start_service, service_env, engine):
    collector = start_service("services.collector", {**service_env, "SHUTDOWN_GRACE_S": "60"})
    prefix = f"sig{uuid.uuid4().hex[:8]}-"
    channel = channel_to(collector)
    stub = collector_pb2_grpc.CollectorServiceStub(channel)
    holder = engine.connect()
    try:
        hold_event_id(holder, prefix + "held")
        call = stub.IngestEvents.future(request_of(prefix + "a", prefix + "held", prefix + "b"), timeout=120)
        wait_until(lambda: blocked_collector_backend(engine), "the collector call to block on the held id")

        collector.signal(signal.SIGTERM)
        wait_until(lambda: any(e.get("msg") == "shutting down" for e in log_entries(collector)),
                   "the collector to begin its shutdown")
        assert collector.alive() and not call.done()

        holder.rollback()                   # the held id is free: the call can finish
        response = call.result()
        assert (response.accepted, response.duplicates, response.rejected) == (3, 0, 0)
        assert collector.process.wait(60) == 0
    finally:
        holder.close()
        channel.close()
    assert count_events(engine, prefix) == 3


def grpcurl(*args: str, data: str | None = None, cwd: Path | None = None) -> str:
    argv = [GRPCURL, "-plaintext", "-max-time", "30"] + (["-d", data] if data is not None else []) + list(args)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_lists_and_calls_the_collector_through_reflection(start_service, service_env, engine, tmp_path):
    collector = start_service("services.collector", service_env)
    channel_to(collector).close()
    # Run from an empty folder: no proto file anywhere near, only server reflection.
    services = grpcurl(collector.address, "list", cwd=tmp_path).split()
    assert COLLECTOR_SERVICE in services and "grpc.health.v1.Health" in services
    methods = grpcurl(collector.address, "list", COLLECTOR_SERVICE).split()
    assert {f"{COLLECTOR_SERVICE}.{m}" for m in ("IngestEvents", "StreamEvents", "UpsertItems",
                                                  "DeleteItems")} <= set(methods)
    assert "user_id" in grpcurl(collector.address, "describe", "deltarec.v1.Event")

    prefix = f"curl{uuid.uuid4().hex[:8]}-"
    body = {"events": [
        {"event_id": prefix + "1", "type": "EVENT_TYPE_VIEW", "user_id": "u-curl", "item_id": "B00ROSE",
         "timestamp": "2024-03-01T09:30:00Z", "attributes": {"page": "pdp"}},
        {"event_id": prefix + "2", "type": "EVENT_TYPE_SEARCH", "user_id": "u-curl", "query": "rose toner"},
        {"event_id": prefix + "3", "type": "EVENT_TYPE_CLICK", "user_id": "u-curl"}]}
    reply = json.loads(grpcurl(collector.address, f"{COLLECTOR_SERVICE}/IngestEvents", data=json.dumps(body),
                             cwd=tmp_path))
    assert reply["accepted"] == 2 and reply["rejected"] == 1
    assert [r["status"] for r in reply["results"]] == ["EVENT_STATUS_ACCEPTED", "EVENT_STATUS_ACCEPTED",
                                                      "EVENT_STATUS_REJECTED"]
    assert reply["results"][2]["reason"] == "item_id: required"
    assert count_events(engine, prefix) == 2

    health = json.loads(grpcurl(collector.address, "grpc.health.v1.Health/Check",
                                data=json.dumps({"service": COLLECTOR_SERVICE})))
    assert health["status"] == "SERVING"


def metric_samples(process) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_calls_errors_and_latency(start_service, service_env):
    collector = start_service("services.collector", service_env)
    channel = channel_to(collector)
    stub = collector_pb2_grpc.CollectorServiceStub(channel)
    prefix = f"met{uuid.uuid4().hex[:8]}-"
    stub.IngestEvents(request_of(prefix + "1", prefix + "2"), timeout=30)
    stub.IngestEvents(request_of(prefix + "1"), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.IngestEvents(collector_pb2.IngestEventsRequest(), timeout=30)
    channel.close()

    labels = (("method", "IngestEvents"), ("service", COLLECTOR_SERVICE))
    samples = metric_samples(collector)
    assert samples[("deltarec_grpc_calls_total", labels)] == 3
    assert samples[("deltarec_grpc_errors_total", tuple(sorted(labels + (("code", "INVALID_ARGUMENT"),))))] == 1
    assert samples[("deltarec_grpc_latency_seconds_count", labels)] == 3
    assert samples[("deltarec_grpc_latency_seconds_bucket", tuple(sorted(labels + (("le", "+Inf"),))))] == 3
    assert samples[("deltarec_collector_events_total", (("outcome", "accepted"),))] == 2
    assert samples[("deltarec_collector_events_total", (("outcome", "duplicate"),))] == 1


def test_one_structured_access_log_line_per_call(start_service, service_env):
    collector = start_service("services.collector", service_env)
    channel = channel_to(collector)
    stub = collector_pb2_grpc.CollectorServiceStub(channel)
    stub.IngestEvents(request_of(f"log{uuid.uuid4().hex[:8]}-1"), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.UpsertItems(collector_pb2.UpsertItemsRequest(), timeout=30)
    channel.close()

    def access_lines():
        lines = [e for e in log_entries(collector) if e.get("logger") == "deltarec.access"]
        return lines if len(lines) >= 2 else None

    lines = wait_until(access_lines, "two access log lines")
    assert len(lines) == 2
    ingest, upsert = lines
    assert ingest["method"] == f"{COLLECTOR_SERVICE}/IngestEvents" and ingest["code"] == "OK"
    assert upsert["method"] == f"{COLLECTOR_SERVICE}/UpsertItems" and upsert["code"] == "INVALID_ARGUMENT"
    for line in lines:
        assert line["service"] == "collector" and line["level"] == "info"
        assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0
        assert line["peer"].startswith("ipv4:127.0.0.1:")


# ------------------------------------------------------------------------------ Postgres outage

@pytest.fixture
def private_postgres():
    """A Postgres cluster of this test alone (the deltarec OS user must reach it: not under /tmp's
    private pytest folders)."""
    state = REPO_ROOT / ".run" / f"test-pg-outage-{uuid.uuid4().hex[:8]}"
    port, _ = infra.start_postgres(state)
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{infra.PG_DATABASE}"
    db.migrate(url)
    yield state, url
    infra.stop_postgres(state)
    shutil.rmtree(state, ignore_errors=True)


def test_unavailable_while_postgres_is_down_then_recovery(start_service, service_env, private_postgres):
    state, url = private_postgres
    collector = start_service("services.collector", {**service_env, "DATABASE_URL": url}, name="collector-outage")
    channel = channel_to(collector)
    stub = collector_pb2_grpc.CollectorServiceStub(channel)
    prefix = f"out{uuid.uuid4().hex[:8]}-"
    in_flight_ids = [prefix + "a", prefix + "held", prefix + "b"]
    while_down_ids = [prefix + "c", prefix + "d"]
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        assert stub.IngestEvents(request_of(prefix + "warm"), timeout=30).accepted == 1

        # A call in flight when Postgres goes away: held on a lock, then its connection is cut.
        holder = engine.connect()
        hold_event_id(holder, prefix + "held")
        call = stub.IngestEvents.future(request_of(*in_flight_ids), timeout=120)
        wait_until(lambda: blocked_collector_backend(engine), "the collector call to block on the held id")
        infra.stop_postgres(state)
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        holder.invalidate()

        # New calls while it is down: UNAVAILABLE, nothing reported accepted.
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as info:
                stub.IngestEvents(request_of(*while_down_ids), timeout=60)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.UpsertItems(collector_pb2.UpsertItemsRequest(
                items=[common_pb2.Item(item_id=prefix + "item", title="Shea Butter Hand Cream")]), timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()

        infra.start_postgres(state)
        # The same batches again. The in-flight one may or may not have committed: a fast shutdown
        # ends the holder's backend too, and the freed lock can let the collector's transaction
        # commit just before its own connection is cut (the client saw UNAVAILABLE either way).
        # That is why a retry is idempotent: all three are stored exactly once, none twice.
        response = stub.IngestEvents(request_of(*in_flight_ids), timeout=60)
        assert response.accepted + response.duplicates == 3 and response.rejected == 0
        assert response.duplicates in (0, 3), "a batch commits whole or not at all"
        response = stub.IngestEvents(request_of(*while_down_ids), timeout=60)
        assert (response.accepted, response.duplicates) == (2, 0)
        assert count_events(engine, prefix) == 6
        assert collector.alive()
    finally:
        channel.close()
        engine.dispose()
