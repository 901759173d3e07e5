"""How cost grows with the work: a table over catalog size (items 10k / 100k / 1M) and user count
(users 10k / 100k / 1M), synthetic, with titles padded toward Beauty's length (67 characters on
average; each row reports its `mean_title_chars`).

    .venv/bin/python bench/scale.py            # 10k, 100k and 1M rows
    .venv/bin/python bench/scale.py --quick    # the 10k and 100k rows

Items (each size: a features stand-in process serving the catalog with random unit text
vectors, and the real ranker, as bench/ranker.py does; MiniLM is not run: embedding 1M titles
on two shared CPU cores would take hours, and serving cost does not depend on the vectors' values):
- ranker memory (RSS) once serving, and time from start to serving (catalog load + first model +
  every index built), with its phases (`catalog_loaded_s`, `first_model_s`, `indexes_built_s`)
  so that a row out of time still says how far it got;
- index build on a swap: a second model version is published to etcd; the time until the replica
  serves it (`swap_served_s`: its item vectors computed; from RANKER_HNSW_MIN_ITEMS on an exact
  scan while the HNSW structure is built) and until its model index is built
  (`swap_index_build_s`, the swap's figure); `model_index_built_s` is the same point of the start;
  a row whose text index (Search's, built once) is out of time still measures Recommend and the
  swap, which do not wait for it; then a third version, the second's weights moved by
  INCREMENTAL_MOVE (`--incremental-move`; an incremental update's stand-in, moving the item
  vectors about as far as a real 1% update does), whose HNSW index may take the second's
  graph (`incremental_swap_*`, VectorIndex.reuse_graph);
- Recommend p50/p99 at concurrency 8 (users warmed into the user cache first).
Users (each size):
- features: real collector + Postgres + features; up to SLICE_USERS (100k) users get 2 events
  each through the real path (IngestEvents, 1000 per call); the features apply rate (events/s
  from the first to the last commit applied), its memory (RSS) and the size of user_features in
  Postgres. Past SLICE_USERS (the 1M row) the other users are preloaded into user_features by
  COPY, with the state features' own fold makes of 2 events each, and the apply rate is that of
  the 100k-user slice into a store of 1M users (2M events through features at ~2k events/s, its
  rate on these cores, would take most of an hour);
- the ranker's user cache: bytes per cached user measured in-process (tracemalloc) with features'
  default history (50 entries) and a 200-item seen set, times min(users, RANKER_USER_CACHE_SIZE).
`first_limit` names the first measured row that crossed a limit: p99 >= 25 ms, a swap longer
than 60 s, a process above 8 GB (of 24 GB shared by all services), or a step that did not
finish within its time budget.

Reference in the same output: the bare faiss search of the same index kind and size (one query,
k=30, in this process; with its recall@30 against exact search, 1.0 for flat) beside the ranker's
Recommend p50, and for users a raw COPY of the same
event rows into a scratch table beside the features apply rate.

Progress goes to stderr; the LAST stdout line is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import tracemalloc
import uuid

import grpc
import numpy as np

import _harness
from _harness import progress, ratio

MEMORY_LIMIT_GB = 8.0
SWAP_LIMIT_S = 60.0
# Share of each weight tensor's spread that the "incremental" version 3 moves version 2's weights
# by (item vectors then move by about as much of their norm: 0.05 moved them 5.0% median). A real
# 1% trainer update of the default model moves them 10.5% median / 12.9% p90
# (bench/incremental.py's vector_movement, 2026-12-02 and -03), hence 0.10; --incremental-move.
INCREMENTAL_MOVE = 0.10
P99_LIMIT_MS = 25.0
# Users that get their events through the real path in one row; past this the rest of the row's
# users are preloaded into user_features (the apply rate is measured on this slice).
SLICE_USERS = 100_000


def rss_gb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024 / 1024, 3)
    return 0.0


def registration(etcd, replica_id: str) -> dict:
    from services.contracts.etcd_keys import ranker_key
    kv = etcd.get(ranker_key(replica_id))
    return json.loads(kv.value) if kv is not None else {}


def model_index_built(value: dict, version: int) -> bool:
    """The replica serves `version` from its finished model index (not the exact scan a bulk
    load answers from while an HNSW structure is built; the text index may still be building)."""
    return (value.get("model_version") == version and value.get("index_kind") != "scan"
            and not value.get("index_rebuilding", value.get("rebuilding")))


def wait_serving(etcd, replica_id: str, version: int, timeout_s: float) -> dict:
    """Seconds until the replica serves `version` (`served_s`, possibly on the exact scan) and
    until its model index is built (`built_s`); None for a point not reached in `timeout_s`."""
    began = time.perf_counter()
    out: dict = {"served_s": None, "built_s": None}
    while time.perf_counter() - began < timeout_s:
        value = registration(etcd, replica_id)
        elapsed = round(time.perf_counter() - began, 1)
        if out["served_s"] is None and value.get("model_version") == version:
            out["served_s"] = elapsed
        if model_index_built(value, version):
            out["built_s"] = elapsed
            break
        time.sleep(0.2)
    return out


def wait_start_phases(etcd, replica_id: str, n_items: int, began: float, deadline: float) -> dict:
    """Seconds from `began` to each phase of a replica's start, from its registration: the whole
    catalog in its text index (`catalog_loaded_s`), the first model serving (flat while HNSW
    builds: `first_model_s`), and every index built (`indexes_built_s`); a phase not reached
    before `deadline` is absent, so a row that runs out of time still says how far it got."""
    phases: dict = {}
    reported: set[str] = set()
    while time.perf_counter() < deadline:
        value = registration(etcd, replica_id)
        elapsed = round(time.perf_counter() - began, 1)
        if "catalog_loaded_s" not in phases and value.get("text_index_size", 0) >= n_items:
            phases["catalog_loaded_s"] = elapsed
        if "first_model_s" not in phases and value.get("model_version") == 1:
            phases["first_model_s"] = elapsed
        if "model_index_built_s" not in phases and model_index_built(value, 1):
            phases["model_index_built_s"] = elapsed
        if "catalog_loaded_s" in phases and value.get("model_version") == 1 and not value.get("rebuilding"):
            phases["indexes_built_s"] = elapsed
            break
        for phase in ("catalog_loaded_s", "first_model_s", "model_index_built_s"):
            if phase in phases and phase not in reported:
                reported.add(phase)
                progress(f"items {n_items}: {phase} {phases[phase]}")
        time.sleep(0.5)
    phases["last_registration"] = {key: value.get(key) for key in (
        "index_kind", "index_size", "text_index_kind", "text_index_size", "index_rebuilding",
        "text_index_rebuilding")}
    return phases


def recommend_load(address: str, users: list[str], concurrency: int, duration_s: float) -> dict:
    from deltarec.v1 import ranker_pb2

    async def main() -> dict:
        channel = grpc.aio.insecure_channel(address)
        call = channel.unary_unary("/deltarec.v1.RankerService/Recommend",
                                   request_serializer=ranker_pb2.RecommendRequest.SerializeToString,
                                   response_deserializer=ranker_pb2.RecommendResponse.FromString)
        for start in range(0, len(users), 64):      # warm the user cache
            await asyncio.gather(*(call(ranker_pb2.RecommendRequest(user_id=u, k=10), timeout=30)
                                   for u in users[start:start + 64]))
        latencies: list[float] = []
        stop_at = time.perf_counter() + duration_s

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.perf_counter() < stop_at:
                began = time.perf_counter()
                await call(ranker_pb2.RecommendRequest(user_id=rng.choice(users), k=10), timeout=30)
                latencies.append(time.perf_counter() - began)
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        await channel.close()
        figures = _harness.percentiles(latencies, scale=1000, digits=2)
        return {"rps": round(len(latencies) / duration_s, 1), "p50_ms": figures["p50"], "p99_ms": figures["p99"]}
    return asyncio.run(main())


def bare_search(n: int, kind: str, dim: int = 64, queries: int = 200) -> dict:
    """p50 of one faiss query (k=30) on n random unit vectors, the reference of a Recommend, and
    its recall@30 against an exact search of the same vectors (1.0 for flat)."""
    import faiss

    from services.ranker.index_structures import IndexOptions
    from services.ranker.vector_index import VectorIndex
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # built as the ranker builds (from the whole set, its build threads), searched on one thread
    index = VectorIndex(dim, IndexOptions(kind=kind, background=False))
    index.begin_bulk_load()
    index.upsert(np.arange(n), x)
    index.end_bulk_load()
    faiss.omp_set_num_threads(1)
    latencies = []
    found = []
    for i in range(queries):
        began = time.perf_counter()
        _, ids = index.search(x[i:i + 1], 30)
        latencies.append(time.perf_counter() - began)
        found.append(ids[0])
    exact = faiss.IndexFlatIP(dim)
    exact.add(x)
    _, truth = exact.search(x[:queries], 30)
    recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / 30 for f, t in zip(found, truth)]))
    return {"bare_search_p50_us": _harness.percentiles(latencies, scale=1e6, digits=0)["p50"],
            "bare_search_recall_at_30": round(recall, 3)}


def items_row(suite, etcd, n_items: int, budget_s: float, duration_s: float,
              incremental_move: float = INCREMENTAL_MOVE) -> dict:
    from tests import fakes
    spec = f"synthetic:{n_items}:long"
    dataset, vectors = _harness.bench_catalog(spec)
    item_ids = [item.item_id for item in dataset.items]
    row: dict = {"items": n_items, "mean_title_chars": round(float(np.mean([len(i.title) for i in dataset.items])), 1)}
    replica_id = f"scale-{uuid.uuid4().hex[:6]}"
    processes = []
    specs = {}
    # 1: the first model; 2: another model (a full retrain: a new space); 3: version 2 with every
    # weight moved by `incremental_move` of its spread (a stand-in for an incremental update)
    for version in (1, 2, 3):
        artifact = fakes.make_artifact(version, item_ids, vectors, dim=64, max_len=50, num_layers=2,
                                       popular=item_ids[:200], seed=2 if version == 3 else None,
                                       perturb=incremental_move if version == 3 else 0.0)
        specs[version] = fakes.store_artifact(suite.artifact_store(), artifact)
        if version == 2:
            full_vectors = np.asarray(artifact.item_vectors)
        if version == 3:   # how far the stand-in moves the vectors (a real update: bench/incremental.py)
            row["incremental_vector_movement"] = _harness.vector_movement(
                (item_ids, full_vectors), (item_ids, np.asarray(artifact.item_vectors)))
            del full_vectors
        del artifact
    del vectors     # 1.5 GB at 1M items, needed only for the artifacts (the stand-in has its own)
    try:
        for version in (1, 2, 3):
            spec_json = specs[version]
            if version == 1:
                fakes.publish(etcd, spec_json)
                began = time.perf_counter()
                # a 1M-item stand-in makes its catalog for minutes on loaded cores
                stand_in = suite.start_features_stand_in(spec, timeout_s=budget_s)
                processes.append(stand_in)
                # RANKER_STARTUP_TIMEOUT_S (300 s by default) bounds the catalog load; at 1M items
                # on loaded cores that alone can take longer, and this row measures it instead.
                ranker = suite.start_ranker(stand_in.address, replica_id, name=f"ranker-scale-{n_items}",
                                            database=False, timeout_s=budget_s,
                                            RANKER_STARTUP_TIMEOUT_S=str(budget_s))
                processes.append(ranker)
                row |= wait_start_phases(etcd, replica_id, n_items, began, began + budget_s)
                row["start_to_serving_s"] = row.get("indexes_built_s")
                row["ranker_rss_gb"] = rss_gb(ranker.process.pid)
                if row["start_to_serving_s"] is None:
                    row["limit"] = f"indexes not built within {budget_s:.0f} s of the start"
                    if row.get("model_index_built_s") is None:
                        progress(f"items {n_items}: {row}")
                        return row
                    # only the text index (Search's) is out of time: Recommend and the swap,
                    # which do not wait for it, are still measured
                row["index_kind"] = registration(etcd, replica_id).get("index_kind")
                row["features_stand_in_rss_gb"] = rss_gb(stand_in.process.pid)
                users = list(dataset.sequences)[:3000]
                row["recommend_c8"] = recommend_load(ranker.address, users, 8, duration_s)
                row |= bare_search(n_items, "hnsw" if row["index_kind"] == "hnsw" else "flat")
                row["recommend_p50_vs_bare_search"] = ratio(row["recommend_c8"]["p50_ms"] * 1000,
                                                            row["bare_search_p50_us"])
            else:
                prefix = "swap" if version == 2 else "incremental_swap"
                fakes.publish(etcd, spec_json)
                swap = wait_serving(etcd, replica_id, version, budget_s)
                row[f"{prefix}_served_s"] = swap["served_s"]
                row[f"{prefix}_index_build_s"] = swap["built_s"]
                row[f"ranker_rss_after_{prefix}_gb"] = rss_gb(ranker.process.pid)
                if swap["built_s"] is None:
                    row["limit"] = f"{prefix.replace('_', ' ')} not done within {budget_s:.0f} s"
                    break
        progress(f"items {n_items}: {row}")
        return row
    finally:
        for process in reversed(processes):
            suite.stop(process, timeout_s=20)


def preload_users(suite, prefix: str, count: int, below_lsn: int, chunk: int = 50_000) -> dict:
    """Puts `count` users into user_features with COPY, each with the state features' own fold
    (user_state.apply_event) makes of 2 view events, stamped below the applied watermark: a store
    of that many users without pushing their events through the pipeline, whose ~2k events/s
    would take most of an hour for 1M users. Their events are not in `events` (a COPY there would
    stream to features through CDC all the same)."""
    import csv
    import io
    from datetime import datetime, timezone

    from services.contracts.event_row import EventRow
    from services.features import user_state
    rng = random.Random(count)
    connection = suite.connect()
    began = time.perf_counter()
    when = datetime(2026, 12, 1, tzinfo=timezone.utc)
    with connection.cursor() as cursor:
        for start in range(0, count, chunk):
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            for u in range(start, min(start + chunk, count)):
                user_id = f"{prefix}-pre-{u:07d}"
                state = user_state.UserState(user_id)
                for n in range(2):
                    row = EventRow(event_id=f"{prefix}-pre-{u}-{n}", event_type="view", user_id=user_id,
                                   item_id=f"S{rng.randrange(10_000):05d}", query=None, occurred_at=when,
                                   row_id=u * 2 + n + 1)
                    user_state.apply_event(state, row, below_lsn, history_length=50, recent_queries=20)
                writer.writerow([user_id, json.dumps([e.to_json() for e in state.history]),
                                 json.dumps(state.counters, sort_keys=True),
                                 json.dumps([q.to_json() for q in state.recent_queries]), state.updated_lsn,
                                 json.dumps(state.seen_to_json()), state.seen_truncated])
            buffer.seek(0)
            cursor.copy_expert("COPY user_features (user_id, history, counters, recent_queries, updated_lsn, "
                               "seen_items, seen_truncated) FROM STDIN WITH (FORMAT csv)", buffer)
            connection.commit()
            progress(f"preloaded {min(start + chunk, count)} of {count} users")
    elapsed = time.perf_counter() - began
    connection.close()
    return {"preloaded_users": count, "preload_s": round(elapsed, 1)}


def users_row(suite, collector, features, features_pid: int, n_users: int, budget_s: float,
              slice_users: int) -> dict:
    """A store of `n_users` users; `slice_users` of them (all, for the smaller rows) are new users
    getting 2 events each through the real path (IngestEvents -> Postgres -> CDC -> features),
    the rest preloaded (`preload_users`); how fast features applies the slice."""
    import io

    from deltarec.v1 import collector_pb2, common_pb2, features_pb2
    rng = random.Random(n_users)
    prefix = uuid.uuid4().hex[:6]
    row: dict = {"users": n_users}
    if n_users > slice_users:
        status = features.Status(features_pb2.FeaturesServiceStatusRequest(), timeout=30)
        row |= preload_users(suite, prefix, n_users - slice_users, max(status.applied_lsn, 1))
        # features reads a preloaded row as the state it folded itself
        check = features.GetUserFeatures(features_pb2.GetUserFeaturesRequest(user_id=f"{prefix}-pre-0000000"),
                                         timeout=30)
        if len(check.features.history) != 2:
            raise RuntimeError(f"a preloaded user reads back with {len(check.features.history)} history entries")
    live_users = min(n_users, slice_users)
    events = [common_pb2.Event(event_id=f"{prefix}-{u}-{n}", type=common_pb2.EVENT_TYPE_VIEW,
                               user_id=f"{prefix}-user-{u:07d}", item_id=f"S{rng.randrange(10_000):05d}")
              for u in range(live_users) for n in range(2)]
    began = time.perf_counter()
    last = 0
    for start in range(0, len(events), 1000):
        response = collector.IngestEvents(collector_pb2.IngestEventsRequest(events=events[start:start + 1000]),
                                          timeout=60)
        last = max(last, response.commit_lsn)
    ingest_s = time.perf_counter() - began
    applied_at = None
    while time.perf_counter() - began < budget_s:
        status = features.Status(features_pb2.FeaturesServiceStatusRequest(), timeout=30)
        if status.applied_lsn >= last:
            applied_at = time.perf_counter() - began
            break
        time.sleep(0.5)
    row |= {"live_users": live_users, "events": len(events), "ingest_s": round(ingest_s, 1)}
    if applied_at is None:
        row["limit"] = f"features did not apply {len(events)} events within {budget_s:.0f} s"
    else:
        # ingest and apply overlap: the rate is events over the time to the last one applied
        row["features_apply_events_per_s"] = round(len(events) / applied_at)
        row["features_apply_s"] = round(applied_at, 1)
    row["features_rss_gb"] = rss_gb(features_pid)
    connection = suite.connect()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_total_relation_size('user_features'), (SELECT count(*) FROM user_features)")
        size, users = cursor.fetchone()
        row["user_features_mb"], row["user_features_rows"] = round(size / 1024 / 1024, 1), users
        cursor.execute("CREATE TEMP TABLE copy_reference (event_id text, user_id text, item_id text)")
        buffer = io.StringIO("".join(f"{e.event_id}\t{e.user_id}\t{e.item_id}\n" for e in events))
        began = time.perf_counter()
        cursor.copy_expert("COPY copy_reference FROM STDIN", buffer)
        connection.commit()
        row["reference_copy_events_per_s"] = round(len(events) / (time.perf_counter() - began))
    connection.close()
    row["apply_vs_copy"] = ratio(row.get("features_apply_events_per_s"), row["reference_copy_events_per_s"])
    progress(f"users {n_users}: {row}")
    return row


def cache_bytes_per_user(history: int = 50, seen: int = 200, sample: int = 2000) -> int:
    """Bytes one cached user costs the ranker (history of `history`, a `seen`-item set), measured."""
    from services.ranker.user_cache import CachedUser, UserHistory
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    keep = {}
    for u in range(sample):
        ids = tuple(f"S{(u * 7 + n) % 1_000_000:07d}" for n in range(seen))
        keep[f"user-{u:07d}"] = CachedUser(UserHistory(ids[-history:], (1,) * history,
                                                       tuple(1.7e9 + n for n in range(history)), 1, 1,
                                                       ids, ids[:5]), 0.0)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del keep
    return int(used / sample)


def first_limit(items_rows: list[dict], users_rows: list[dict]) -> str | None:
    for row in items_rows:
        name = f"items {row['items']}"
        if row.get("limit"):
            return f"{name}: {row['limit']}"
        if (row.get("recommend_c8") or {}).get("p99_ms", 0) >= P99_LIMIT_MS:
            return f"{name}: Recommend p99 {row['recommend_c8']['p99_ms']} ms >= {P99_LIMIT_MS}"
        for prefix in ("swap", "incremental_swap"):
            if (row.get(f"{prefix}_index_build_s") or 0) > SWAP_LIMIT_S:
                return f"{name}: {prefix.replace('_', ' ')} {row[f'{prefix}_index_build_s']} s > {SWAP_LIMIT_S}"
        if max(row.get("ranker_rss_gb", 0), row.get("ranker_rss_after_swap_gb", 0),
               row.get("ranker_rss_after_incremental_swap_gb", 0)) > MEMORY_LIMIT_GB:
            return f"{name}: ranker memory above {MEMORY_LIMIT_GB} GB"
    for row in users_rows:
        if row.get("limit"):
            return f"users {row['users']}: {row['limit']}"
        if row.get("features_rss_gb", 0) > MEMORY_LIMIT_GB:
            return f"users {row['users']}: features memory above {MEMORY_LIMIT_GB} GB"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 10k and 100k rows only")
    parser.add_argument("--only", choices=("items", "users"), default=None)
    parser.add_argument("--sizes", default=None, help="comma-separated sizes instead of the run's (development)")
    parser.add_argument("--slice-users", type=int, default=SLICE_USERS,
                        help="users per row through the real path; the rest are preloaded")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time budget of each step (a start, a swap); default 600 s with --quick, else 2400 s")
    parser.add_argument("--incremental-move", type=float, default=INCREMENTAL_MOVE,
                        help="share of each weight's spread the incremental stand-in moves version 2 by")
    args = parser.parse_args(argv)
    sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    if args.sizes:
        sizes = [int(size) for size in args.sizes.split(",")]
    budget_s = args.budget_s or (600.0 if args.quick else 2400.0)
    duration_s = 3.0 if args.quick else 10.0
    from services.ranker.config import RankerConfig
    cache_size = RankerConfig.__dataclass_fields__["user_cache_size"].default
    summary: dict = {"benchmark": "scale", "quick": args.quick, "limits": {
        "p99_ms": P99_LIMIT_MS, "swap_s": SWAP_LIMIT_S, "memory_gb": MEMORY_LIMIT_GB}}
    items_rows, users_rows = [], []
    with _harness.Suite("scale") as suite:
        etcd = suite.etcd()
        if args.only in (None, "items"):
            for n in sizes:
                items_rows.append(items_row(suite, etcd, n, budget_s, duration_s, args.incremental_move))
                if items_rows[-1].get("limit"):
                    break
        if args.only in (None, "users"):
            from deltarec.v1 import collector_pb2_grpc, features_pb2_grpc
            per_user = cache_bytes_per_user()
            collector_process = suite.start_collector()
            features_process = suite.start_features(collector_process)
            collector = collector_pb2_grpc.CollectorServiceStub(grpc.insecure_channel(collector_process.address))
            features = features_pb2_grpc.FeaturesServiceStub(grpc.insecure_channel(features_process.address))
            for n in sizes:
                row = users_row(suite, collector, features, features_process.process.pid, n, budget_s,
                                args.slice_users)
                row["ranker_user_cache_mb"] = round(per_user * min(n, cache_size) / 1024 / 1024, 1)
                users_rows.append(row)
                if row.get("limit"):
                    break
            summary["ranker_cache_bytes_per_user"] = per_user
            summary["ranker_user_cache_size"] = cache_size
            summary["users_slice"] = args.slice_users
    summary["items"] = items_rows
    summary["incremental_move"] = args.incremental_move
    summary["users"] = users_rows
    summary["first_limit"] = first_limit(items_rows, users_rows)
    _harness.print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
