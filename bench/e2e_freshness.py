"""End-to-end freshness through the real path (collector -> Postgres -> CDC -> features -> ranker),
as a storefront feels it, at a steady event rate:

- **ingest to changed recommendation**: a user buys the item at the top of their recommendations;
  from IngestEvents returning ACCEPTED to the first Recommend for that user (no min_data_lsn: a
  plain next page view) whose answer no longer holds the item and differs from the answer before;
- **read-your-writes**: an event that touches no item (a search) is ingested and
  Recommend(min_data_lsn = the commit_lsn the ingest returned) is called at once; from the
  ingest's return to the answer (whose data_lsn must be >= that LSN).

    .venv/bin/python bench/e2e_freshness.py            # 100 events/s, 200 probes of each
    .venv/bin/python bench/e2e_freshness.py --quick    # 100 events/s, 40 probes of each

Starts what it needs (bench/_harness.py): Postgres and etcd (scripts/infra.py), a fresh database,
a collector, a features service, a ranker; a synthetic catalog is loaded and embedded (MiniLM in
features) first, a model of production shape (untrained weights, built here from the vectors
features computed) is published through etcd, and every user gets a short history. Then a sender
thread ingests background events (one per IngestEvents call, as a storefront does) at `--rate`
events/s for other users while the probes run one after another.

Reference, measured in the same run: when the same write became visible in features'
GetUserFeatures (polled concurrently with the ranker): the data path alone, which the ranker
cannot beat; `ratio_p95` = end to end / features. Quoted reference: issue 15's measurement
before this design (a 1 s user cache that writes did not invalidate; a 5 s bare watermark):
p50 1,028 ms / p95 1,040 ms to a changed recommendation, p50 ~4 s for read-your-writes.

Progress goes to stderr; the LAST stdout line is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import random
import sys
import threading
import time
import uuid

import grpc

import _harness
from _harness import progress, ratio
from deltarec.v1 import (collector_pb2, collector_pb2_grpc, common_pb2, features_pb2, features_pb2_grpc,
                         ranker_pb2, ranker_pb2_grpc)

TARGET_P95_MS = 300.0
PROBE_TIMEOUT_S = 5.0
SENDER_IN_FLIGHT = 32
SETUP_TIMEOUT_S = 1800.0
POLL_S = 0.005          # the ranker is asked every 5 ms (figures carry up to that much)
FEATURES_POLL_S = 0.01  # features every 10 ms: its reads compete with its apply work
VIEW, PURCHASE, SEARCH = common_pb2.EVENT_TYPE_VIEW, common_pb2.EVENT_TYPE_PURCHASE, common_pb2.EVENT_TYPE_SEARCH
QUOTED_BEFORE = {"ingest_to_changed_recommendation_p50_ms": 1028, "ingest_to_changed_recommendation_p95_ms": 1040,
                 "read_your_writes_p50_ms": 4000,
                 "source": "issue 15 (held-out replay through the public API, before WatchUsers)"}


def event(user: str, kind: int, item: str = "", query: str = "") -> common_pb2.Event:
    return common_pb2.Event(event_id=uuid.uuid4().hex, type=kind, user_id=user, item_id=item, query=query)


def ingest(collector, events) -> collector_pb2.IngestEventsResponse:
    response = collector.IngestEvents(collector_pb2.IngestEventsRequest(events=events), timeout=30)
    if response.accepted != len(events):
        raise RuntimeError(f"ingest not accepted: {[r.reason for r in response.results][:3]}")
    return response


class Sender(threading.Thread):
    """Background events at a steady rate, one per IngestEvents call, on a fixed schedule that
    does not wait for the previous call (a storefront's many clients do not queue behind each
    other): up to SENDER_IN_FLIGHT calls at once; a tick that finds them all busy is counted as
    `missed`, so `achieved_rate` says whether the rate was held."""

    def __init__(self, collector, users: list[str], items: list[str], rate: float) -> None:
        super().__init__(daemon=True, name="sender")
        self.collector, self.users, self.items, self.rate = collector, users, items, rate
        self.stop = threading.Event()
        self.sent = self.missed = self.failed = 0
        self.started_at = self.stopped_at = 0.0
        self._lock = threading.Lock()
        self._in_flight = 0

    def _send(self, one: common_pb2.Event) -> None:
        try:
            ingest(self.collector, [one])
            outcome = "sent"
        except Exception:  # noqa: BLE001 - counted, reported
            outcome = "failed"
        with self._lock:
            self._in_flight -= 1
            setattr(self, outcome, getattr(self, outcome) + 1)

    def run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor
        rng = random.Random(11)
        pool = ThreadPoolExecutor(max_workers=SENDER_IN_FLIGHT, thread_name_prefix="sender")
        self.started_at = next_at = time.perf_counter()
        while not self.stop.is_set():
            kind = rng.choice((VIEW, VIEW, VIEW, common_pb2.EVENT_TYPE_CLICK, common_pb2.EVENT_TYPE_ADD_TO_CART,
                               PURCHASE))
            one = event(rng.choice(self.users), kind, rng.choice(self.items))
            with self._lock:
                busy = self._in_flight >= SENDER_IN_FLIGHT
                if not busy:
                    self._in_flight += 1
            if busy:
                self.missed += 1
            else:
                pool.submit(self._send, one)
            next_at += 1.0 / self.rate
            delay = next_at - time.perf_counter()
            if delay > 0:
                self.stop.wait(delay)
        self.stopped_at = time.perf_counter()
        pool.shutdown(wait=True)

    def achieved_rate(self) -> float:
        return self.sent / max((self.stopped_at or time.perf_counter()) - self.started_at, 1e-9)


def wait_features_visible(features, user: str, bought: str, began: float, out: list) -> None:
    """The reference: when features' GetUserFeatures shows the purchase."""
    deadline = began + PROBE_TIMEOUT_S
    while time.perf_counter() < deadline:
        state = features.GetUserFeatures(features_pb2.GetUserFeaturesRequest(user_id=user, max_history=1),
                                         timeout=5)
        if bought in state.features.purchased_item_ids:
            out.append(time.perf_counter() - began)
            return
        time.sleep(FEATURES_POLL_S)


def probe_purchase(collector, ranker, features, user: str) -> tuple[float | None, float | None]:
    before = ranker.Recommend(ranker_pb2.RecommendRequest(user_id=user, k=10), timeout=5)
    ids_before = [item.item_id for item in before.items]
    bought = ids_before[0]
    response = ingest(collector, [event(user, PURCHASE, bought)])
    began = time.perf_counter()
    reference: list[float] = []
    checker = threading.Thread(target=wait_features_visible,
                               args=(features, user, bought, began, reference))
    checker.start()
    seen = None
    while time.perf_counter() - began < PROBE_TIMEOUT_S:
        try:
            answer = ranker.Recommend(ranker_pb2.RecommendRequest(user_id=user, k=10),
                                      timeout=max(began + PROBE_TIMEOUT_S - time.perf_counter(), 0.01))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            break
        ids = [item.item_id for item in answer.items]
        if bought not in ids and ids != ids_before:
            seen = time.perf_counter() - began
            break
        time.sleep(POLL_S)
    checker.join()
    return seen, (reference[0] if reference else None)


def probe_read_your_writes(collector, ranker, user: str) -> tuple[float | None, str | None]:
    """(seconds to the answer, None), or (None, why there was none): a deadline or a stale answer
    is counted and reported (a stale one is a correctness failure), not the end of the run."""
    response = ingest(collector, [event(user, SEARCH, query=f"gift idea {random.randrange(10**6)}")])
    began = time.perf_counter()
    try:
        answer = ranker.Recommend(ranker_pb2.RecommendRequest(user_id=user, k=10, min_data_lsn=response.commit_lsn),
                                  timeout=PROBE_TIMEOUT_S)
    except grpc.RpcError as error:
        return None, error.code().name
    elapsed = time.perf_counter() - began
    if answer.freshness.data_lsn < response.commit_lsn:
        progress(f"stale answer: data_lsn {answer.freshness.data_lsn} < min_data_lsn {response.commit_lsn}")
        return None, "stale"
    return elapsed, None


def caught_up(ranker, user: str, lsn: int) -> bool:
    try:
        ranker.Recommend(ranker_pb2.RecommendRequest(user_id=user, min_data_lsn=lsn), timeout=60)
        return True
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        return False


def figures_ms(values: list[float]) -> dict:
    figures = _harness.percentiles(values, scale=1000, digits=1)
    return {f"{key}_ms": figures[key] for key in ("p50", "p95", "p99", "max")} | {"count": figures["count"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rate", type=float, default=100.0, help="background events per second")
    parser.add_argument("--probes", type=int, default=None, help="probes of each kind (default 200; quick 40)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of every service started (development)")
    args = parser.parse_args(argv)
    probes = args.probes or (40 if args.quick else 200)
    n_items, n_users = (300, 200) if args.quick else (2000, 1000)
    from scripts import datasets
    from tests import fakes
    import numpy as np

    extra_env = dict(item.split("=", 1) for item in args.env)
    with _harness.Suite("e2e_freshness") as suite:
        collector_process = suite.start_collector(**extra_env)
        features_process = suite.start_features(collector_process, **extra_env)
        collector = collector_pb2_grpc.CollectorServiceStub(grpc.insecure_channel(collector_process.address))
        features = features_pb2_grpc.FeaturesServiceStub(grpc.insecure_channel(features_process.address))
        dataset = datasets.synthetic(n_items=n_items, n_users=n_users, seed=3)
        items = dataset.items
        item_ids = [item.item_id for item in items]
        progress(f"loading {len(items)} items")
        _harness.upsert_catalog(collector, _harness.catalog_messages(items))
        # Set-up, not a figure: MiniLM on two cores shared with other work can take many minutes.
        _harness.wait_embedded(features, len(items), timeout_s=SETUP_TIMEOUT_S)
        vectors = {}
        for start in range(0, len(item_ids), 1000):
            found = features.GetItemFeatures(features_pb2.GetItemFeaturesRequest(
                item_ids=item_ids[start:start + 1000], include_embedding=True), timeout=60)
            vectors.update({i.item_id: np.frombuffer(i.embedding.values, "<f4") for i in found.items})
        artifact = fakes.make_artifact(1, item_ids, np.stack([vectors[i] for i in item_ids]), dim=64, max_len=50,
                                       num_layers=2, popular=item_ids[:100])
        fakes.publish(suite.etcd(), fakes.store_artifact(suite.artifact_store(), artifact))
        ranker_process = suite.start_ranker(features_process.address, f"bench-e2e-{uuid.uuid4().hex[:4]}",
                                            **extra_env)
        ranker = ranker_pb2_grpc.RankerServiceStub(grpc.insecure_channel(ranker_process.address))

        users = [f"user-{n}" for n in range(n_users)]
        rng = random.Random(5)
        seed_events = [event(user, VIEW, rng.choice(item_ids)) for user in users for _ in range(5)]
        last_lsn = 0
        for start in range(0, len(seed_events), 500):
            last_lsn = ingest(collector, seed_events[start:start + 500]).commit_lsn
        # Set-up: the ranker waits at most RANKER_MAX_LSN_WAIT_S per call (FAILED_PRECONDITION
        # after), and on loaded cores features may take longer than that to apply the seed events.
        from tests.support import wait_until
        wait_until(lambda: caught_up(ranker, users[0], last_lsn), f"the ranker to reach LSN {last_lsn}",
                   SETUP_TIMEOUT_S, 0.5)
        progress(f"{n_users} users with 5 views each; ranker caught up at LSN {last_lsn}")

        probe_users, background_users = users[: n_users // 4], users[n_users // 4:]
        sender = Sender(collector, background_users, item_ids, args.rate)
        sender.start()
        time.sleep(1.0)
        changed, reference, timeouts = [], [], 0
        for n in range(probes):
            seen, features_seen = probe_purchase(collector, ranker, features, probe_users[n % len(probe_users)])
            if seen is None:
                timeouts += 1
            else:
                changed.append(seen)
            if features_seen is not None:
                reference.append(features_seen)
            time.sleep(rng.uniform(0.02, 0.08))
        progress(f"ingest -> changed recommendation: {figures_ms(changed)}; features visible: {figures_ms(reference)}")
        read_your_writes, read_failures = [], {}
        for n in range(probes):
            elapsed, failure = probe_read_your_writes(collector, ranker, probe_users[n % len(probe_users)])
            if failure is None:
                read_your_writes.append(elapsed)
            else:
                read_failures[failure] = read_failures.get(failure, 0) + 1
            time.sleep(rng.uniform(0.02, 0.08))
        progress(f"read-your-writes: {figures_ms(read_your_writes)}")
        sender.stop.set()
        sender.join(10)
        rate = round(sender.achieved_rate(), 1)

    e2e, ref, ryw = figures_ms(changed), figures_ms(reference), figures_ms(read_your_writes)
    summary = {
        "benchmark": "e2e_freshness", "quick": args.quick, "items": n_items, "users": n_users,
        "background_rate_target": args.rate, "background_rate_achieved": rate,
        "background_missed_ticks": sender.missed, "background_failed": sender.failed, "probes": probes,
        "ingest_to_changed_recommendation": e2e | {"timeouts": timeouts},
        "read_your_writes": ryw | {"failures": read_failures},
        "reference_features_visible": ref,
        "ratio_p95": ratio(e2e["p95_ms"], ref["p95_ms"]),
        "ratio_p50": ratio(e2e["p50_ms"], ref["p50_ms"]),
        "quoted_before": QUOTED_BEFORE,
        "speedup_p95_vs_before": ratio(QUOTED_BEFORE["ingest_to_changed_recommendation_p95_ms"], e2e["p95_ms"]),
        "target_p95_ms": TARGET_P95_MS,
        "meets_target": bool(rate >= 0.95 * args.rate and e2e["p95_ms"] is not None and e2e["p95_ms"] < TARGET_P95_MS and not timeouts
                             and ryw["p95_ms"] is not None and ryw["p95_ms"] < TARGET_P95_MS
                             and not read_failures),
    }
    _harness.print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
