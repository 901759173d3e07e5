"""Soak: mixed ingest, Recommend, Search and model swaps for a sustained period.

    python bench/soak.py            # 30 minutes
    python bench/soak.py --quick    # 1 minute

A whole stack of its own (scripts/drills.py): a stream of item events (--rate per second,
batches of 10), Recommend and Search at --qps each (users and words of the drill), and an
incremental Update published every --swap-every seconds (each one a hot swap in the ranker).
Measured: errors per operation (any non-OK answer; an over-deadline call counts), p50/p99 per
tenth of the run and the drift of p99 (last tenth / first tenth), and the resident memory of every
service process at the start and at the end (growth in MB and as a ratio). The reference is the
run's own first tenth (p99) and the start (memory); the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "gen"))

import grpc  # noqa: E402

from deltarec.v1 import ranker_pb2, ranker_pb2_grpc, trainer_pb2, trainer_pb2_grpc  # noqa: E402
from scripts.drills import WORDS, KINDS, DrillStack, EventStream, account  # noqa: E402


def say(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Load(threading.Thread):
    """One operation at `qps`, recording (when, latency, ok)."""

    def __init__(self, name: str, call, qps: float, stop: threading.Event) -> None:
        super().__init__(name=f"soak-{name}", daemon=True)
        self.op, self.call, self.interval, self.stop_event = name, call, 1.0 / qps, stop
        self.samples: list[tuple[float, float, bool]] = []
        self.errors: dict[str, int] = {}

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            started = time.monotonic()
            ok = True
            try:
                self.call()
            except grpc.RpcError as error:
                ok = False
                self.errors[error.code().name] = self.errors.get(error.code().name, 0) + 1
            self.samples.append((started, time.monotonic() - started, ok))
            next_at += self.interval
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))
            if time.monotonic() - next_at > 1.0:
                next_at = time.monotonic()


def windows(samples: list[tuple[float, float, bool]], start: float, duration: float, parts: int = 10):
    out = []
    for part in range(parts):
        low, high = start + duration * part / parts, start + duration * (part + 1) / parts
        latencies = [latency for when, latency, ok in samples if low <= when < high and ok]
        out.append({"p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
                    "p99_ms": round(percentile(latencies, 0.99) * 1000, 2), "n": len(latencies)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--rate", type=float, default=50.0, help="events per second")
    parser.add_argument("--qps", type=float, default=20.0, help="Recommend and Search, each")
    parser.add_argument("--swap-every", type=float, default=None, help="seconds between model updates")
    args = parser.parse_args()
    duration = 60.0 * (args.minutes if args.minutes is not None else (1.0 if args.quick else 30.0))
    swap_every = args.swap_every or (15.0 if args.quick else 120.0)
    state = Path(__file__).resolve().parent.parent / ".run" / f"bench-soak-{uuid.uuid4().hex[:8]}"
    # Threshold 1: every Update makes a version (the gate of the tiny model lets it publish).
    stack = DrillStack(state, items=300, service_env={"trainer": {"TRAINER_MODEL_EPOCHS": "3",
                                                                  "TRAINER_STRATEGY_THRESHOLD": "1"}})
    try:
        say("starting the stack")
        stack.start()
        stack.wait_serving()
        stream = EventStream(stack.address("collector"), stack.items, rate=args.rate, batch=10, users=200).start()
        while len(stream.ledger.acknowledged) < 500:
            time.sleep(0.2)
        stack.wait_caught_up()
        trainer = trainer_pb2_grpc.TrainerServiceStub(stack.channel("trainer"))
        ranker = ranker_pb2_grpc.RankerServiceStub(stack.channel("ranker"))
        trainer.Train(trainer_pb2.TrainRequest(publish=True), timeout=600)

        rng = random.Random(11)
        words = [w.lower() for w in WORDS] + [k.lower() for k in KINDS]

        def recommend():
            ranker.Recommend(ranker_pb2.RecommendRequest(user_id=rng.choice(stream.users), k=10), timeout=2)

        def search():
            ranker.Search(ranker_pb2.SearchRequest(query=f"{rng.choice(words)} {rng.choice(words)}", k=10,
                                                   user_id=rng.choice(stream.users)), timeout=2)

        stop = threading.Event()
        loads = [Load("recommend", recommend, args.qps, stop), Load("search", search, args.qps, stop)]
        memory_start = {name: round(rss_mb(p.process.pid), 1) for name, p in stack.processes.items()}
        ingest_start = len(stream.latencies)
        started = time.monotonic()
        for load in loads:
            load.start()
        swaps, swap_errors, published, skipped = 0, 0, 0, 0
        say(f"soaking for {duration:.0f} s")
        while time.monotonic() - started < duration:
            time.sleep(min(swap_every, max(0.0, duration - (time.monotonic() - started))))
            if time.monotonic() - started >= duration:
                break
            try:
                outcome = trainer.Update(trainer_pb2.UpdateRequest(publish=True), timeout=300)
                swaps += 1
                published += int(outcome.published)
                skipped += int(outcome.skipped)
            except grpc.RpcError as error:
                swap_errors += 1
                say(f"update failed: {error.code().name}")
        stop.set()
        for load in loads:
            load.join(10)
        elapsed = time.monotonic() - started
        memory_end = {name: round(rss_mb(p.process.pid), 1) for name, p in stack.processes.items()}
        stream.stop()
        stack.wait_caught_up(timeout_s=300)
        counts = account(stack, stream)
        served = ranker.Status(ranker_pb2.RankerServiceStatusRequest(), timeout=5)

        per_op = {}
        for load in loads:
            parts = windows(load.samples, started, elapsed)
            first, last = parts[0]["p99_ms"], parts[-1]["p99_ms"]
            per_op[load.op] = {"requests": len(load.samples), "errors": sum(load.errors.values()),
                               "error_codes": load.errors, "windows": parts,
                               "p99_first_ms": first, "p99_last_ms": last,
                               "p99_drift_ratio": round(last / first, 3) if first else None}
        ingest_latencies = stream.latencies[ingest_start:]
        growth = {name: round(memory_end[name] - memory_start[name], 1) for name in memory_start}
        result = {
            "benchmark": "soak", "quick": args.quick, "duration_s": round(elapsed, 1),
            "ingest": {"acknowledged": counts["acknowledged"], "lost": counts["lost"], "doubled": counts["doubled"],
                       "errors": sum(stream.ledger.errors.values()), "error_codes": dict(stream.ledger.errors),
                       "p99_ms": round(percentile(ingest_latencies, 0.99) * 1000, 2)},
            **per_op,
            "model_swaps": {"updates": swaps, "published": published, "skipped": skipped, "failed": swap_errors,
                            "ranker_swaps": served.swaps, "serving_version": served.freshness.model_version},
            "errors_total": sum(sum(load.errors.values()) for load in loads) + sum(stream.ledger.errors.values())
            + swap_errors,
            "memory_mb_start": memory_start, "memory_mb_end": memory_end, "memory_growth_mb": growth,
            "memory_growth_ratio": {name: round(memory_end[name] / memory_start[name], 3)
                                    for name in memory_start if memory_start[name]},
            "reference": "first tenth of the run (p99) and the start (memory)",
        }
        print(json.dumps(result))
        return 0
    finally:
        stack.close()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
