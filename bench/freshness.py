"""Freshness: from the collector accepting an event to the event showing in GetUserFeatures, at a
steady event rate; beside a bare durable consumer of the delta stream (the same events reaching a
plain DeltaConsumer that only commits its high-water mark) in the same run.

    .venv/bin/python bench/freshness.py            # full: 100 events/s for 60 s
    .venv/bin/python bench/freshness.py --quick    # < 60 s: 50 events/s for 15 s

Starts what it needs by itself (bench/_harness.py): Postgres and etcd through scripts/infra.py,
a fresh database, a collector and a features service. The catalog is loaded (and embedded)
first, so that the measured window holds behaviour events only, as in steady operation.

- A sender calls IngestEvents with one event per call (as a storefront does) on a fixed schedule
  (`--rate` events/s; users drawn from a pool so histories have realistic lengths). "Accepted" is
  when the response arrives: the event is committed.
- Features: one checker thread polls GetUserFeatures for the oldest event not yet seen until the
  user's counters include it; latency = seen - accepted.
- Bare durable consumer (reference): a DeltaConsumer of its own consumer group in this process
  that, per batch, commits its LSN high-water mark to Postgres (the least any exactly-once
  consumer does) and then records the batch's events as applied; latency = applied - accepted.
  The delivery alone is reported too (`stream_*`: when the delta arrives; it can be slightly
  negative, the stream may deliver a commit before the client received its response).
`ratio_p50` / `ratio_p99` = features / bare durable consumer; `added_p50_ms` = the difference —
what the feature work (decoding, user state, item statistics, one transaction, the read path and
the 2 ms polling of this benchmark) adds on top of a minimal consumer.

Progress goes to stderr; the LAST stdout line is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

import grpc

import _harness
from _harness import progress, ratio
from deltarec.v1 import collector_pb2, collector_pb2_grpc, common_pb2, features_pb2, features_pb2_grpc
from scripts import datasets
from services.common.delta_consumer import DeltaConsumer, row_of
from tests.support import wait_until

CATALOG_ITEMS = 300
USERS = 500


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """{p50_ms, p95_ms, p99_ms, max_ms, mean_ms} of latencies in seconds."""
    figures = _harness.percentiles(seconds, scale=1000, digits=2)
    return {f"{key}_ms": figures[key] for key in ("p50", "p95", "p99", "max", "mean")}


class Sent:
    """Events accepted by the collector: (event_id, user, count of that user's events) by order."""

    def __init__(self) -> None:
        self.accepted_at: dict[str, float] = {}
        self.pending: deque[tuple[str, str, int]] = deque()
        self.condition = threading.Condition()
        self.done = False


def send_events(collector, items: list[str], rate: float, duration_s: float, sent: Sent,
                errors: list) -> None:
    rng = random.Random(11)
    per_user: dict[str, int] = {}
    total = int(rate * duration_s)
    started = time.perf_counter()
    try:
        for n in range(total):
            due = started + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            user = f"fresh-u{rng.randrange(USERS)}"
            event_id = f"fresh-{n}"
            event = common_pb2.Event(event_id=event_id, type=rng.choice(
                [common_pb2.EVENT_TYPE_VIEW, common_pb2.EVENT_TYPE_VIEW, common_pb2.EVENT_TYPE_CLICK,
                 common_pb2.EVENT_TYPE_PURCHASE]), user_id=user, item_id=rng.choice(items))
            response = collector.IngestEvents(collector_pb2.IngestEventsRequest(events=[event]), timeout=30)
            accepted = time.perf_counter()
            if response.accepted != 1:
                raise RuntimeError(f"event not accepted: {response}")
            per_user[user] = per_user.get(user, 0) + 1
            with sent.condition:
                sent.accepted_at[event_id] = accepted
                sent.pending.append((event_id, user, per_user[user]))
                sent.condition.notify_all()
    except BaseException as error:  # noqa: BLE001 - reported by main
        errors.append(error)
    finally:
        with sent.condition:
            sent.done = True
            sent.condition.notify_all()


def check_features(features, sent: Sent, latencies: list[float], errors: list) -> None:
    """Polls the oldest unseen event's user until its counters include it."""
    try:
        while True:
            with sent.condition:
                sent.condition.wait_for(lambda: sent.pending or sent.done)
                if not sent.pending:
                    return
                event_id, user, count = sent.pending[0]
            while True:
                request = features_pb2.GetUserFeaturesRequest(user_id=user, max_history=1)
                response = features.GetUserFeatures(request, timeout=30)
                if sum(response.features.counters.values()) >= count:
                    seen = time.perf_counter()
                    break
                time.sleep(0.002)
            with sent.condition:
                sent.pending.popleft()
                latencies.append(seen - sent.accepted_at[event_id])
    except BaseException as error:  # noqa: BLE001 - reported by main
        errors.append(error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 events/s for 15 s, under 60 s")
    parser.add_argument("--rate", type=float, default=None, help="events per second (default 100, 50 quick)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of traffic (default 60, 15 quick)")
    parser.add_argument("--infra-dir", type=Path, default=_harness.INFRA_DIR)
    args = parser.parse_args(argv)
    rate = args.rate or (50.0 if args.quick else 100.0)
    duration = args.duration or (15.0 if args.quick else 60.0)

    with _harness.Suite("freshness", infra_dir=args.infra_dir) as suite:
        collector_process = suite.start_collector(name="collector-bench-fresh")
        features_process = suite.start_features(collector_process, name="features-bench-fresh")
        collector = collector_pb2_grpc.CollectorServiceStub(grpc.insecure_channel(collector_process.address))
        features = features_pb2_grpc.FeaturesServiceStub(grpc.insecure_channel(features_process.address))

        catalog = _harness.catalog_messages(datasets.load_default(max_users=1).items[:CATALOG_ITEMS])
        _harness.upsert_catalog(collector, catalog)
        _harness.wait_embedded(features, len(catalog), 300)
        progress(f"catalog of {len(catalog)} items embedded")

        # The reference: the same events on the bare delta stream, in a consumer group of its own.
        sent = Sent()
        arrivals: dict[str, float] = {}
        applied: dict[str, float] = {}
        bare_ready = threading.Event()
        mark_connection = suite.connect()
        with mark_connection.cursor() as cursor:
            cursor.execute("INSERT INTO consumer_offsets (consumer) VALUES ('bench_bare') "
                           "ON CONFLICT DO NOTHING")
        mark_connection.commit()

        def record(batch) -> None:
            arrived = time.perf_counter()
            event_ids = [row_of(delta.new_row)["event_id"] for delta in batch.deltas
                         if delta.table == "events"]
            with mark_connection.cursor() as cursor:
                cursor.execute("UPDATE consumer_offsets SET applied_lsn = %s WHERE consumer = 'bench_bare'",
                               (batch.commit_lsn,))
            mark_connection.commit()
            committed = time.perf_counter()
            for event_id in event_ids:
                arrivals[event_id] = arrived
                applied[event_id] = committed

        def on_heartbeat(heartbeat) -> None:
            bare_ready.set()
        bare = DeltaConsumer(collector_process.address, "bench_bare", record, tables=["events"],
                             on_heartbeat=on_heartbeat).start()
        try:
            if not bare_ready.wait(60):
                raise RuntimeError("the bare delta consumer did not connect")
            items = [item.item_id for item in catalog]
            errors: list[BaseException] = []
            latencies: list[float] = []
            sender = threading.Thread(target=send_events, args=(collector, items, rate, duration, sent, errors))
            checker = threading.Thread(target=check_features, args=(features, sent, latencies, errors))
            progress(f"sending {rate:g} events/s for {duration:g} s")
            sender.start()
            checker.start()
            sender.join()
            checker.join(120)
            if errors:
                raise errors[0]
            try:
                wait_until(lambda: len(applied) >= len(sent.accepted_at),
                           "the bare consumer to apply every event", 60)
            except AssertionError:
                pass      # the check below says how many are missing
            bare_latencies = [applied[event_id] - accepted for event_id, accepted in sent.accepted_at.items()
                              if event_id in applied]
            stream_latencies = [arrivals[event_id] - accepted for event_id, accepted in sent.accepted_at.items()
                                if event_id in arrivals]
            if len(bare_latencies) != len(sent.accepted_at) or len(latencies) != len(sent.accepted_at):
                raise RuntimeError(f"{len(sent.accepted_at)} events sent, {len(latencies)} seen in features, "
                                   f"{len(bare_latencies)} on the bare stream")
            status = features.Status(features_pb2.FeaturesServiceStatusRequest(), timeout=30)
        finally:
            bare.stop()

    features_figures = percentiles_ms(latencies)
    bare_figures = percentiles_ms(bare_latencies)
    stream_figures = percentiles_ms(stream_latencies)
    progress(f"features: p50 {features_figures['p50_ms']} ms, p95 {features_figures['p95_ms']} ms, "
             f"p99 {features_figures['p99_ms']} ms; bare durable consumer p50 {bare_figures['p50_ms']} ms, "
             f"p99 {bare_figures['p99_ms']} ms")
    summary = {
        "benchmark": "freshness", "quick": args.quick, "events": len(latencies), "rate_per_s": rate,
        "duration_s": duration, "users": USERS, "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **{f"features_{key}": value for key, value in features_figures.items()},
        **{f"bare_consumer_{key}": value for key, value in bare_figures.items()},
        **{f"stream_{key}": value for key, value in stream_figures.items()},
        "ratio_p50": ratio(features_figures["p50_ms"], bare_figures["p50_ms"]),
        "ratio_p99": ratio(features_figures["p99_ms"], bare_figures["p99_ms"]),
        "added_p50_ms": round(features_figures["p50_ms"] - bare_figures["p50_ms"], 2),
        "added_p99_ms": round(features_figures["p99_ms"] - bare_figures["p99_ms"], 2),
        "features_users": status.users, "measured_at": datetime.now(timezone.utc).isoformat(),
    }
    _harness.print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
