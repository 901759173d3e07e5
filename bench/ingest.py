"""Ingest throughput: events/s through the collector's IngestEvents vs a direct COPY of the same rows.

    .venv/bin/python bench/ingest.py            # full: ~200k events (all of Amazon Beauty)
    .venv/bin/python bench/ingest.py --quick    # < 60 s: 30k events

Starts what it needs by itself (bench/_harness.py): Postgres and etcd through scripts/infra.py,
a fresh database, and one collector process. The events are the Amazon Beauty sequences
(../shared/data/amazon-beauty) replayed as views, purchases and searches with synthetic timestamps;
synthetic users and items when the data set is absent.

Measured, on the same rows, each time into an empty `events` table (same indexes and constraints):
- gRPC: IngestEvents with batches of 500 over loopback, from 1 and from 4 concurrent clients;
- COPY: psycopg2 copy_expert of the same rows and columns, one COPY + COMMIT per 500 rows (the
  same unit of durability as a gRPC batch), from one connection; and, for reference, the whole set
  as one COPY in one transaction.
`ratio_vs_copy` = best gRPC events/s / per-batch COPY events/s (target >= 0.5).

Progress goes to stderr; the LAST stdout line is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc

import _harness
from _harness import progress
from deltarec.v1 import collector_pb2, collector_pb2_grpc, common_pb2
from scripts import datasets
from services.contracts.event_types import PROTO_BY_NAME

COLUMNS = ("event_id", "event_type", "user_id", "item_id", "query", "occurred_at", "attributes")
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
TARGET_RATIO = 0.5


# ---------------------------------------------------------------------------- the events

def beauty_catalog(data_dir: Path) -> list[common_pb2.Item]:
    """The Beauty items under their ASINs (as a storefront would name them)."""
    catalog = datasets.read_beauty_catalog(data_dir)
    return [common_pb2.Item(item_id=asin, title=catalog.title_of[item_id].strip() or asin, category="Beauty",
                            active=True) for item_id, asin in catalog.asin_of.items()]


def synthetic_catalog() -> list[common_pb2.Item]:
    return [common_pb2.Item(item_id=f"SYN{i:06d}", title=f"Synthetic beauty product {i}", category="Beauty",
                            active=True) for i in range(12000)]


def beauty_events(data_dir: Path, limit: int) -> list[tuple]:
    """Users' sequences replayed round-robin (order within a user is real): each interaction is a
    view, every third also a purchase, and one in ten is preceded by a search for the title."""
    catalog = datasets.read_beauty_catalog(data_dir)
    sequences = [(f"beauty-u{user}", [(catalog.asin_of[i], catalog.title_of[i])
                                       for i in items if i in catalog.asin_of])
                 for user, items in datasets.read_beauty_sequences(data_dir).items()]
    rows: list[tuple] = []
    position = 0
    while len(rows) < limit:
        active = False
        for user, items in sequences:
            if position >= len(items):
                continue
            active = True
            asin, title = items[position]
            if position % 10 == 0 and title.strip():
                rows.append(_row(f"{user}-{position}-s", "search", user, None,
                                 " ".join(title.split()[:4]).lower(), len(rows), {"source": "beauty"}))
            rows.append(_row(f"{user}-{position}-v", "view", user, asin, None, len(rows),
                             {"source": "beauty", "position": str(position)}))
            if position % 3 == 2:
                rows.append(_row(f"{user}-{position}-p", "purchase", user, asin, None, len(rows),
                                 {"source": "beauty", "quantity": "1"}))
            if len(rows) >= limit:
                break
        if not active:  # the whole data set is in: start over with new ids
            position, sequences = 0, [(f"{user}r", items) for user, items in sequences]
            continue
        position += 1
    return rows[:limit]


def synthetic_events(limit: int) -> list[tuple]:
    rng = random.Random(7)
    rows = []
    for index in range(limit):
        user = f"syn-u{rng.randrange(20000)}"
        if index % 10 == 0:
            rows.append(_row(f"syn-{index}", "search", user, None, rng.choice(
                ["vitamin c serum", "rose water toner", "matte lipstick", "argan oil"]), index, {"source": "synthetic"}))
        else:
            kind = rng.choice(["view", "view", "view", "click", "add_to_cart", "purchase"])
            rows.append(_row(f"syn-{index}", kind, user, f"SYN{rng.randrange(12000):06d}", None, index,
                             {"source": "synthetic"}))
    return rows


def _row(event_id, kind, user, item, query, index, attributes) -> tuple:
    return (event_id, kind, user, item, query, T0 + timedelta(seconds=index), attributes)


def to_request(rows: list[tuple]) -> collector_pb2.IngestEventsRequest:
    request = collector_pb2.IngestEventsRequest()
    for event_id, kind, user, item, query, occurred_at, attributes in rows:
        event = request.events.add(event_id=event_id, type=PROTO_BY_NAME[kind], user_id=user,
                                   item_id=item or "", query=query or "", attributes=attributes)
        event.timestamp.FromDatetime(occurred_at)
    return request


def _copy_text(value) -> str:
    if value is None:
        return "\\N"
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def to_copy_buffer(rows: list[tuple]) -> str:
    lines = []
    for event_id, kind, user, item, query, occurred_at, attributes in rows:
        values = (event_id, kind, user, item, query, occurred_at.isoformat(), json.dumps(attributes))
        lines.append("\t".join(_copy_text(v) for v in values))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the runs

def truncate(connection) -> None:
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE events, rejected_events")
    connection.commit()


def count_events(connection) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM events")
        count = cursor.fetchone()[0]
    connection.commit()
    return count


def run_copy(connection, buffers: list[str]) -> float:
    sql = f"COPY events ({', '.join(COLUMNS)}) FROM STDIN"
    started = time.perf_counter()
    with connection.cursor() as cursor:
        for buffer in buffers:
            cursor.copy_expert(sql, io.StringIO(buffer))
            connection.commit()
    return time.perf_counter() - started


def run_grpc(address: str, requests: list, threads: int) -> tuple[float, list[float], int, int]:
    """Clients take batches from a shared list; returns (seconds, per-call latencies, accepted,
    unknown items)."""
    channels = [grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
                for _ in range(threads)]
    stubs = [collector_pb2_grpc.CollectorServiceStub(channel) for channel in channels]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=30)
    next_index, lock = [0], threading.Lock()
    latencies: list[float] = []
    accepted, unknown, errors = [0], [0], []

    def client(stub) -> None:
        mine_latencies, mine_accepted, mine_unknown = [], 0, 0
        try:
            while True:
                with lock:
                    index = next_index[0]
                    next_index[0] += 1
                if index >= len(requests):
                    break
                started = time.perf_counter()
                response = stub.IngestEvents(requests[index], timeout=120)
                mine_latencies.append(time.perf_counter() - started)
                mine_accepted += response.accepted
                mine_unknown += response.unknown_items
        except Exception as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)
        with lock:
            latencies.extend(mine_latencies)
            accepted[0] += mine_accepted
            unknown[0] += mine_unknown

    workers = [threading.Thread(target=client, args=(stub,)) for stub in stubs]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    for channel in channels:
        channel.close()
    if errors:
        raise RuntimeError(f"IngestEvents failed: {errors[0]}")
    return elapsed, latencies, accepted[0], unknown[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30k events, whole run under 60 s")
    parser.add_argument("--events", type=int, default=None, help="number of events (default 200k, 30k quick)")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--threads", default="1,4", help="client thread counts to measure")
    parser.add_argument("--data-dir", type=Path, default=_harness.beauty_dir())
    parser.add_argument("--infra-dir", type=Path, default=_harness.INFRA_DIR)
    args = parser.parse_args(argv)
    total = args.events or (30_000 if args.quick else 200_000)
    thread_counts = [int(t) for t in args.threads.split(",")]

    if (args.data_dir / "sequences.txt").exists():
        source, rows, catalog = "amazon-beauty", beauty_events(args.data_dir, total), beauty_catalog(args.data_dir)
    else:
        source, rows, catalog = "synthetic", synthetic_events(total), synthetic_catalog()
    batches = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
    requests = [to_request(batch) for batch in batches]
    buffers = [to_copy_buffer(batch) for batch in batches]
    progress(f"{len(rows)} events from {source} in {len(batches)} batches of {args.batch}")

    with _harness.Suite("ingest", infra_dir=args.infra_dir) as suite:
        connection = suite.connect()
        with connection.cursor() as cursor:
            cursor.execute("SHOW fsync")
            fsync = cursor.fetchone()[0]
        connection.commit()
        collector = suite.start_collector(LOG_LEVEL="INFO", COLLECTOR_MAX_BATCH=str(max(1000, args.batch)))
        # The catalog first, so that the per-event "item known?" lookups run against real items.
        channel = grpc.insecure_channel(collector.address)
        stub = collector_pb2_grpc.CollectorServiceStub(channel)
        for start in range(0, len(catalog), 500):
            stub.UpsertItems(collector_pb2.UpsertItemsRequest(items=catalog[start:start + 500]), timeout=120)
        channel.close()
        progress(f"catalog: {len(catalog)} items")
        # Warm-up (connections, caches), then an empty table for every measured run.
        run_grpc(collector.address, requests[:4], 2)

        results: dict[str, float] = {}
        truncate(connection)
        copy_s = run_copy(connection, buffers)
        assert count_events(connection) == len(rows), "COPY stored fewer rows than sent"
        results["events_per_s_copy"] = len(rows) / copy_s
        progress(f"COPY, {args.batch} rows per transaction: {results['events_per_s_copy']:,.0f} events/s")

        truncate(connection)
        copy_one_s = run_copy(connection, [to_copy_buffer(rows)])
        results["events_per_s_copy_one_transaction"] = len(rows) / copy_one_s
        progress(f"COPY, one transaction: {results['events_per_s_copy_one_transaction']:,.0f} events/s")

        latencies_by_threads = {}
        for threads in thread_counts:
            truncate(connection)
            seconds, latencies, accepted, unknown_items = run_grpc(collector.address, requests, threads)
            stored = count_events(connection)
            if accepted != len(rows) or stored != len(rows):
                raise RuntimeError(f"{threads} threads: {accepted} accepted, {stored} stored, {len(rows)} sent")
            results[f"events_per_s_grpc_{threads}_threads"] = len(rows) / seconds
            latencies_by_threads[threads] = latencies
            progress(f"IngestEvents, {threads} client thread(s): {len(rows) / seconds:,.0f} events/s, "
                     f"batch p95 {_harness.percentiles(latencies, scale=1000)['p95']:.1f} ms")

        best_threads = max(thread_counts, key=lambda t: results[f"events_per_s_grpc_{t}_threads"])
        best = results[f"events_per_s_grpc_{best_threads}_threads"]
        summary = {
            "benchmark": "ingest", "quick": args.quick, "source": source, "events": len(rows),
            "batch_size": args.batch, "postgres_fsync": fsync, "cpus": os.cpu_count(),
            "catalog_items": len(catalog), "unknown_item_events": unknown_items,
            "events_per_s_grpc": round(best), "best_client_threads": best_threads,
            **{key: round(value) for key, value in results.items()},
            "ratio_vs_copy": round(best / results["events_per_s_copy"], 3),
            "ratio_vs_copy_one_transaction": round(best / results["events_per_s_copy_one_transaction"], 3),
            **{f"batch_p50_ms_{t}_threads": _harness.percentiles(l, scale=1000)["p50"]
               for t, l in latencies_by_threads.items()},
            **{f"batch_p95_ms_{t}_threads": _harness.percentiles(l, scale=1000)["p95"]
               for t, l in latencies_by_threads.items()},
            "target_ratio_vs_copy": TARGET_RATIO,
            "meets_target": best / results["events_per_s_copy"] >= TARGET_RATIO,
        }
    _harness.print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
