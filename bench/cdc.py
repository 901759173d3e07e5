"""Change-data-capture benchmark: the collector's delta stream against a bare replication reader.

    .venv/bin/python bench/cdc.py            # full: 30 s at 200 tx/s, 100k-row backlog
    .venv/bin/python bench/cdc.py --quick    # < 60 s: 8 s at 200 tx/s, 20k-row backlog

Starts Postgres and etcd through scripts/infra.py, a fresh database and a collector (all through
bench/_harness.py). Two readers follow the same workload in the same run:

- deltarec: DeltaConsumer -> Collector.Subscribe (gRPC) -> slot + pgoutput decoder (the product);
- bare:     one psycopg2 LogicalReplicationConnection on its own slot, pgoutput, no decoding
            beyond the message type and the xid, feedback after each commit.

Phase 1, latency: a writer commits one-event transactions at a steady rate; for each
transaction, commit-to-delivery latency = when the reader got it - when COMMIT returned to the
writer (matched by xid). Phase 2, throughput: with both readers stopped, a backlog of N events
(transactions of 10 rows) is committed; each reader then drains it alone; deltas/s = N / time.

Progress goes to stderr; the LAST stdout line is one JSON object with all figures.
"""
from __future__ import annotations

import argparse
import select
import sys
import threading
import time

import psycopg2
import psycopg2.extras

import _harness
from _harness import progress as log, ratio
from services.common.delta_consumer import DeltaConsumer
from tests.support import wait_until

GROUP = "bench"


# ---------------------------------------------------------------------------- readers
class DeltarecReader:
    """The product path: a DeltaConsumer on the collector."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.arrivals: dict[int, float] = {}
        self.deltas = 0
        self.mark = 0
        self.lock = threading.Lock()
        self.consumer: DeltaConsumer | None = None

    def apply(self, batch) -> None:
        now = time.perf_counter()
        with self.lock:
            if batch.commit_lsn <= self.mark:
                return
            for delta in batch.deltas:
                self.arrivals.setdefault(delta.xid, now)
            if not batch.snapshot:
                self.deltas += len(batch.deltas)
            self.mark = batch.commit_lsn

    def start(self) -> None:
        self.consumer = DeltaConsumer(self.address, GROUP, self.apply, tables=["events"], max_batch_size=500,
                                      resume_lsn=lambda: self.mark).start()

    def stop(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()


class BareReader:
    """A bare psycopg2 logical replication reader: pgoutput bytes, message type and xid only."""

    def __init__(self, dsn: str, slot: str) -> None:
        self.dsn, self.slot = dsn, slot
        self.arrivals: dict[int, float] = {}
        self.deltas = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def create_slot(self) -> None:
        connection = psycopg2.connect(self.dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
        connection.cursor().create_replication_slot(self.slot, output_plugin="pgoutput")
        connection.close()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        connection = psycopg2.connect(self.dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
        cursor = connection.cursor()
        cursor.start_replication(slot_name=self.slot, decode=False,
                                 options={"proto_version": "1", "publication_names": "deltarec_cdc"})
        xid = 0
        try:
            while not self._stop.is_set():
                message = cursor.read_message()
                if message is None:
                    select.select([cursor], [], [], 0.2)
                    continue
                payload = message.payload
                kind = payload[0]
                if kind == 0x42:                                   # Begin
                    xid = int.from_bytes(payload[17:21], "big")
                elif kind == 0x49:                                 # Insert
                    self.deltas += 1
                elif kind == 0x43:                                 # Commit
                    self.arrivals.setdefault(xid, time.perf_counter())
                    cursor.send_feedback(flush_lsn=message.data_start)
        finally:
            connection.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


# ---------------------------------------------------------------------------- workload
def steady_writer(dsn: str, rate: float, seconds: float) -> dict[int, float]:
    """One-event transactions at `rate` per second; returns xid -> time COMMIT returned."""
    connection = psycopg2.connect(dsn)
    commits: dict[int, float] = {}
    interval, start = 1.0 / rate, time.perf_counter()
    n = 0
    with connection.cursor() as cursor:
        while True:
            due = start + n * interval
            now = time.perf_counter()
            if due - start >= seconds:
                break
            if due > now:
                time.sleep(due - now)
            cursor.execute("INSERT INTO events (event_id, event_type, user_id, item_id, occurred_at) "
                           "VALUES (%s, 'view', 'u', 'i', now()) RETURNING txid_current()",
                           (f"lat-{n}",))
            xid = cursor.fetchone()[0] & 0xFFFFFFFF
            connection.commit()
            commits[xid] = time.perf_counter()
            n += 1
    connection.close()
    return commits


def backlog(dsn: str, rows: int, per_transaction: int = 10) -> None:
    connection = psycopg2.connect(dsn)
    with connection.cursor() as cursor:
        for first in range(0, rows, per_transaction):
            cursor.execute("INSERT INTO events (event_id, event_type, user_id, item_id, occurred_at) "
                           "SELECT 'bl-' || n, 'click', 'u' || (n %% 100), 'i' || (n %% 1000), now() "
                           "FROM generate_series(%s, %s) n", (first, min(rows, first + per_transaction) - 1))
            connection.commit()
    connection.close()


def drain(reader, rows: int, timeout_s: float) -> float:
    """Starts `reader` and returns deltas/s until it has received `rows` more deltas."""
    target = reader.deltas + rows
    started = time.perf_counter()
    reader.start()
    try:
        wait_until(lambda: reader.deltas >= target, f"{rows} deltas", timeout_s, interval_s=0.01)
    except AssertionError:   # reported, and the rate of what did arrive measured
        log(f"{type(reader).__name__}: only {reader.deltas - target + rows}/{rows} deltas within {timeout_s:.0f}s")
    elapsed = time.perf_counter() - started
    return round(min(reader.deltas - target + rows, rows) / elapsed, 1)


def latencies(commits: dict[int, float], arrivals: dict[int, float]) -> list[float]:
    return [(arrivals[xid] - at) * 1000.0 for xid, at in commits.items() if xid in arrivals]


# ---------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (< 60 s)")
    parser.add_argument("--rate", type=float, default=200.0, help="transactions per second in phase 1")
    parser.add_argument("--seconds", type=float, default=None, help="length of phase 1")
    parser.add_argument("--backlog", type=int, default=None, help="rows in phase 2")
    args = parser.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 30.0)
    rows = args.backlog or (20_000 if args.quick else 100_000)

    with _harness.Suite("cdc") as suite:
        dsn = suite.dsn
        collector = suite.start_collector(COLLECTOR_HEARTBEAT_S="1", COLLECTOR_ID="bench-collector")
        bare = BareReader(dsn, f"bench_bare_{suite.run_id}")
        bare.create_slot()
        ours = DeltarecReader(collector.address)
        readers = [ours, bare]
        try:
            ours.start()
            wait_until(lambda: ours.mark > 0, "the delta stream to start", 60, interval_s=0.01)
            bare.start()
            time.sleep(0.5)

            log(f"phase 1: {args.rate:.0f} tx/s for {seconds:.0f} s")
            commits = steady_writer(dsn, args.rate, seconds)
            try:
                wait_until(lambda: all(xid in ours.arrivals and xid in bare.arrivals for xid in commits),
                           "every transaction at both readers", 30, interval_s=0.01)
            except AssertionError:   # the latencies of those that arrived; `count` says how many
                log("not every transaction reached both readers within 30 s")
            ours_latency = _harness.percentiles(latencies(commits, ours.arrivals), digits=3)
            bare_latency = _harness.percentiles(latencies(commits, bare.arrivals), digits=3)
            log(f"latency ms deltarec {ours_latency}  bare {bare_latency}")

            log(f"phase 2: backlog of {rows} events in transactions of 10")
            ours.stop()
            bare.stop()
            backlog(dsn, rows)
            ours_rate = drain(ours, rows, 300)
            log(f"deltarec drained at {ours_rate} deltas/s")
            ours.stop()
            bare_rate = drain(bare, rows, 300)
            log(f"bare reader drained at {bare_rate} deltas/s")
            bare.stop()
        finally:
            for reader in readers:
                reader.stop()

        result = {
            "benchmark": "cdc", "quick": args.quick, "rate_tx_s": args.rate, "phase1_seconds": seconds,
            "transactions": len(commits), "backlog_rows": rows,
            "deltarec": {"latency_ms": ours_latency, "throughput_deltas_s": ours_rate},
            "bare_psycopg2": {"latency_ms": bare_latency, "throughput_deltas_s": bare_rate},
            "ratios": {
                "latency_p50": ratio(ours_latency["p50"], bare_latency["p50"]),
                "latency_p95": ratio(ours_latency["p95"], bare_latency["p95"]),
                "latency_p99": ratio(ours_latency["p99"], bare_latency["p99"]),
                "throughput": ratio(ours_rate, bare_rate),
            },
        }
    _harness.print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
