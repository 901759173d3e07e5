"""Ranker serving benchmark: Recommend, Search and SimilarItems requests/s and p50/p99 latency at
concurrency 1, 8 and 32, on the Amazon Beauty catalog (12k items, 22k users) and on 100k synthetic
items, against a bare gRPC echo server answering the same requests with responses of the same
bytes, in the same run; plus the flat-vs-HNSW crossover of the faiss index.

    .venv/bin/python bench/ranker.py            # full
    .venv/bin/python bench/ranker.py --quick    # 3000 users, short runs
    .venv/bin/python bench/ranker.py --profile  # + where the ranker's CPU goes (py-spy), c=8
    .venv/bin/python bench/ranker.py --quick --only beauty --workers 2   # RANKER_WORKERS=2

What runs (each a process started by bench/_harness.py, etcd through scripts/infra.py):
- the real ranker (python -m services.ranker, LOG_LEVEL=WARNING so no access line per call),
  with a model artifact built here (untrained weights of the production shape: dim 64, 2 layers,
  max_len 50; the latency does not depend on trained values) published to etcd exactly as the
  trainer does;
- instead of the collector -> Postgres -> features pipeline, a features stand-in
  (tests/fakes.py: WatchItems with the whole catalog, WatchUsers, GetUserFeatures /
  BatchGetUserFeatures with each user's real Beauty history / synthetic history, EmbedText with
  hashed vectors) — a separate process on the same cores. Item text vectors are random unit
  vectors (not MiniLM; nothing measured here depends on their values);
- the echo server: a bare grpc.server (no interceptor) that parses each request and returns a
  pre-built response captured from the ranker (same bytes on the wire), one per catalog, measured
  right after each (method, concurrency) level of the ranker with the same requests (the load
  of the shared machine drifts over minutes: a reference measured later is not the same run).
Before the measured runs every user is asked for once: the replica's user cache (kept exact by
WatchUsers) then holds them, which is the steady state of a replica whose cache holds its active
users (RANKER_USER_CACHE_SIZE, 50k by default); `user_cache` in the output shows the reads of
features that remained. Requests draw users uniformly. Search queries are the first three words
of item titles, with a user; SimilarItems asks for random items.
The load generator is one asyncio gRPC client process (this one) for both servers, over
`--connections` TCP connections (1 by default, 8 with --workers > 1), the same for every server.

Workers (`--workers N`, the ranker started with RANKER_WORKERS=N: N ranker processes on one
SO_REUSEPORT port, services/ranker/supervisor.py): the kernel spreads connections, not requests,
over the processes, so one connection reaches one worker; each worker's user cache is warmed
through its own port. Two references in the same run, right after each level: `echo` (the one
process as always) and `echo_n` (the same echo server as N processes on one SO_REUSEPORT port:
the ranker's shape); `ratio` and `ratio_echo_n`. CPU per request sums the worker processes
(`cpu_shares`: each one's part, how evenly the connections spread), and the RSS of each worker
and of the supervisor is reported after the warm-up and after the runs.

Attribution on vs off (issue 14): two replicas of the same catalog and model, one with
RANKER_ATTRIBUTION=true (each answer gets a recommendation_id and queues its impression, which a
background thread writes to the run's Postgres `impressions` table in batches), one with false,
measured in interleaved rounds (on/off, then off/on, ...: the load of the shared machine drifts
over a run, alternating spreads it over both; quick: 8 rounds of 1.5 s, full: 12 of 5 s) at
concurrency 8 and 32 with Recommend. Each variant's req/s is its requests over its measured
seconds summed over the rounds; the ratio is on / off (target >= 0.95), with the median of the
per-round ratios beside it. The impressions written (rows in the table) and dropped (the replica's
deltarec_impressions_dropped_total) are reported: the "on" replica really did the work. And the
CPU per answer of the impression path measured in this process (stamp, and the flush's encoding of
the batch), as a share of the "off" replica's CPU per Recommend. Beside
throughput, each replica's CPU per request (its process's user + system time over each load, its
warm-up and the 1.5 s after it, where the last impressions are flushed; the Postgres side of the
inserts is not in it): far less sensitive to the machine's load than req/s. With
--profile, py-spy samples both replicas in the first round (c=8).

Crossover: single-query search latency (k=30) of IndexFlatIP vs IndexHNSWFlat (M=32,
efSearch=128) on random unit vectors, one thread, with HNSW recall@10 and build time.

Beside req/s, each server's CPU per request (its process's user + system time over the load):
`cpu_ratio` is the echo server's CPU per request over the ranker's, far less sensitive to the
shared machine's load than the req/s ratio.

Progress goes to stderr; the LAST stdout line is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid

ROLE = os.environ.get("BENCH_RANKER_ROLE", "")
if not ROLE:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import _harness  # noqa: E402
import _profile  # noqa: E402
from _harness import progress  # noqa: E402

TARGET_RATIO = 0.5
TARGET_ATTRIBUTION_RATIO = 0.95
ATTRIBUTION_LEVELS = (8, 32)
TARGET_P99_MS = 25.0
LEVELS = (1, 8, 32)


# ---------------------------------------------------------------------------- child: echo server

def serve_echo() -> None:
    """Answers Recommend, Search and SimilarItems with the responses captured from the ranker
    (BENCH_ECHO_<METHOD> hex), parsing each request like the ranker does."""
    from concurrent import futures

    import grpc

    from deltarec.v1 import ranker_pb2
    from services.contracts.ready_line import ready_line
    handlers = {}
    for method, (request_class, response_class) in METHODS.items():
        payload = os.environ.get(f"BENCH_ECHO_{method.upper()}")
        if not payload:
            continue
        response = getattr(ranker_pb2, response_class).FromString(bytes.fromhex(payload))
        handlers[method] = grpc.unary_unary_rpc_method_handler(
            lambda request, context, response=response: response,
            request_deserializer=getattr(ranker_pb2, request_class).FromString,
            response_serializer=getattr(ranker_pb2, response_class).SerializeToString)

    # BENCH_ECHO_PORT: a port reserved by the benchmark that several echo processes share through
    # SO_REUSEPORT (the reference of a ranker with RANKER_WORKERS > 1); else a port of its own.
    shared_port = int(os.environ.get("BENCH_ECHO_PORT", "0"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=int(os.environ.get("BENCH_ECHO_WORKERS", "16"))),
                         options=[("grpc.so_reuseport", 1 if shared_port else 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("deltarec.v1.RankerService", handlers),))
    port = server.add_insecure_port(f"127.0.0.1:{shared_port}")
    server.start()
    print(ready_line("echo", port, None), flush=True)
    server.wait_for_termination()


# ---------------------------------------------------------------------------- load generator

# method -> (request message, response message)
METHODS = {"Recommend": ("RecommendRequest", "RecommendResponse"),
           "Search": ("SearchRequest", "SearchResponse"),
           "SimilarItems": ("SimilarItemsRequest", "SimilarItemsResponse")}


def requests_for(method: str, users: list[str], item_ids: list[str], titles: list[str], k: int = 10) -> list:
    """The requests a load of `method` draws from: every user (Recommend), title words as
    queries (Search, personalised with a user like a storefront's logged-in search), items
    (SimilarItems)."""
    from deltarec.v1 import ranker_pb2
    rng = random.Random(3)
    if method == "Recommend":
        return [ranker_pb2.RecommendRequest(user_id=user, k=k) for user in users]
    if method == "Search":
        queries = [" ".join(title.split()[:3]) or "cream" for title in rng.sample(titles, min(2000, len(titles)))]
        return [ranker_pb2.SearchRequest(query=q, user_id=rng.choice(users), k=k) for q in queries]
    return [ranker_pb2.SimilarItemsRequest(item_id=i, k=k) for i in rng.sample(item_ids, min(5000, len(item_ids)))]


def run_load(address: str, method: str, requests: list, concurrency: int, duration_s: float, warmup_s: float,
             connections: int = 1) -> dict:
    """`connections`: TCP connections the load is spread over (request loop j uses connection
    j % connections). SO_REUSEPORT spreads connections, not requests, over the processes of a
    port: one connection reaches one worker."""
    import grpc

    from deltarec.v1 import ranker_pb2
    request_class, response_class = METHODS[method]

    async def main() -> dict:
        # A local subchannel pool per channel: channels to one target otherwise share one connection.
        channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(max(1, min(connections, concurrency)))]
        calls = [channel.unary_unary(f"/deltarec.v1.RankerService/{method}",
                                     request_serializer=getattr(ranker_pb2, request_class).SerializeToString,
                                     response_deserializer=getattr(ranker_pb2, response_class).FromString)
                 for channel in channels]
        latencies: list[float] = []
        errors: dict[str, int] = {}
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            call = calls[seed % len(calls)]
            while True:
                began = time.perf_counter()
                if began >= stop_at:
                    return
                try:
                    await call(requests[rng.randrange(len(requests))], timeout=10)
                    if began >= measure_from:
                        latencies.append(time.perf_counter() - began)
                except grpc.aio.AioRpcError as error:
                    if began >= measure_from:
                        errors[error.code().name] = errors.get(error.code().name, 0) + 1

        await asyncio.gather(*(worker(seed) for seed in range(concurrency)))
        for channel in channels:
            await channel.close()
        figures = _harness.percentiles(latencies, scale=1000, digits=2)
        return {"rps": round(len(latencies) / duration_s, 1), "p50_ms": figures["p50"], "p99_ms": figures["p99"],
                "requests": len(latencies), "errors": errors}
    return asyncio.run(main())


def warm_users(address: str, users: list[str], concurrency: int = 32) -> float:
    """Asks for every user once (the replica's user cache then holds them, as a replica's cache
    holds its active users in steady state); returns the seconds it took."""
    import grpc

    from deltarec.v1 import ranker_pb2

    async def main() -> None:
        channel = grpc.aio.insecure_channel(address)
        call = channel.unary_unary("/deltarec.v1.RankerService/Recommend",
                                   request_serializer=ranker_pb2.RecommendRequest.SerializeToString,
                                   response_deserializer=ranker_pb2.RecommendResponse.FromString)
        queue = list(users)

        async def worker() -> None:
            while queue:
                await call(ranker_pb2.RecommendRequest(user_id=queue.pop(), k=10), timeout=30)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await channel.close()
    began = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - began


# ---------------------------------------------------------------------------- crossover

def clustered(n: int, dim: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in n // 50 clusters (catalog embeddings are clustered, not uniform on the
    sphere: uniform random vectors are a worst case no real catalog has), and queries near them."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(n // 50, 1), dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, centers.shape[0], n)] + rng.standard_normal((n, dim), dtype=np.float32) * (0.8 / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, n, queries)] + rng.standard_normal((queries, dim), dtype=np.float32) * (0.8 / np.sqrt(dim))
    return x, q.astype(np.float32)


def crossover(sizes: list[int], dims: list[int], queries: int) -> dict:
    import faiss

    from services.ranker.index_structures import IndexOptions
    from services.ranker.vector_index import VectorIndex
    faiss.omp_set_num_threads(1)
    result: dict = {}
    for dim in dims:
        rows = []
        for n in sizes:
            x, q = clustered(n, dim, queries, seed=n + dim)
            row = {"items": n}
            found = {}
            for kind in ("flat", "hnsw"):
                index = VectorIndex(dim, IndexOptions(kind=kind, background=False))
                began = time.perf_counter()
                index.upsert(np.arange(n), x)
                build = time.perf_counter() - began
                latencies, tops = [], []
                for i in range(queries):
                    began = time.perf_counter()
                    _, ids = index.search(q[i:i + 1], 30)
                    latencies.append(time.perf_counter() - began)
                    tops.append(set(ids[0, :10].tolist()))
                began = time.perf_counter()
                for i in range(20):   # live changes: update one item, remove one item
                    index.upsert([i], q[i:i + 1])
                    index.remove([n - 1 - i])
                change = (time.perf_counter() - began) / 40
                found[kind] = tops
                figures = _harness.percentiles(latencies, scale=1e6, digits=0)
                row[kind] = {"p50_us": int(figures["p50"]), "p99_us": int(figures["p99"]),
                             "build_s": round(build, 2), "change_us": round(change * 1e6)}
                del index
            row["hnsw"]["recall_at_10"] = round(float(np.mean([len(a & b) / 10 for a, b in
                                                               zip(found["flat"], found["hnsw"])])), 3)
            rows.append(row)
            progress(f"crossover dim {dim} n {n}: flat p50 {row['flat']['p50_us']} us, hnsw p50 "
                     f"{row['hnsw']['p50_us']} us (recall@10 {row['hnsw']['recall_at_10']}, build "
                     f"{row['hnsw']['build_s']} s)")
        # first measured size where HNSW is faster, linearly interpolated from the previous one
        cross = None
        for before, after in zip(rows, rows[1:]):
            gap_before = before["flat"]["p50_us"] - before["hnsw"]["p50_us"]
            gap_after = after["flat"]["p50_us"] - after["hnsw"]["p50_us"]
            if gap_before < 0 <= gap_after:
                cross = round(before["items"] + (after["items"] - before["items"]) * (-gap_before)
                              / (gap_after - gap_before))
                break
        if cross is None and rows and rows[0]["flat"]["p50_us"] >= rows[0]["hnsw"]["p50_us"]:
            cross = rows[0]["items"]
        result[f"dim_{dim}"] = {"rows": rows, "hnsw_faster_from_items": cross}
    return result


# ---------------------------------------------------------------------------- one catalog

def bench_one_catalog(suite, spec: str, etcd, levels, duration_s: float, warmup_s: float,
                      extra_env: dict | None = None, profile_level: int | None = None,
                      max_users: int | None = None, workers: int = 1,
                      connections: int = 1) -> tuple[dict, dict[str, bytes]]:
    """Recommend, Search and SimilarItems at each concurrency on one catalog; returns the
    figures and one response of each method (the echo server's payloads)."""
    import grpc

    from deltarec.v1 import ranker_pb2, ranker_pb2_grpc
    from tests import fakes

    began = time.perf_counter()
    dataset, vectors = _harness.bench_catalog(spec)
    item_ids = [item.item_id for item in dataset.items]
    titles = [item.title for item in dataset.items if item.title]
    users = list(dataset.sequences)
    if max_users is not None and len(users) > max_users:
        users = random.Random(5).sample(users, max_users)
    progress(f"{spec}: {len(item_ids)} items, {len(users)} users; building the model artifact")
    artifact = fakes.make_artifact(1, item_ids, vectors, dim=64, max_len=50, num_layers=2,
                                   popular=item_ids[:200])
    spec_json = fakes.store_artifact(suite.artifact_store(), artifact)
    del artifact
    fakes.publish(etcd, spec_json)
    processes = []
    holder = None      # the echo_n reference's shared port
    try:
        stand_in = suite.start_features_stand_in(spec)
        processes.append(stand_in)
        replica_id = f"bench-{uuid.uuid4().hex[:6]}"
        ranker = suite.start_ranker(stand_in.address, replica_id, name=f"ranker-{spec.replace(':', '-')}",
                                    database=False, RANKER_WORKERS=str(workers), **(extra_env or {}))
        processes.append(ranker)
        # With workers each registers as <id>-w<i> at its own port: waited for, warmed and
        # measured apart (each has its own user cache); the load goes to the shared port.
        replica_ids = [replica_id] if workers == 1 else [f"{replica_id}-w{i}" for i in range(workers)]
        registrations = [wait_settled(etcd, rid, spec) for rid in replica_ids]
        registration = registrations[0]
        channel = grpc.insecure_channel(ranker.address)
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        status = stub.Status(ranker_pb2.RankerServiceStatusRequest(), timeout=10)
        progress(f"{spec}: ranker ready in {time.perf_counter() - began:.1f}s (model v{status.freshness.model_version}, "
                 f"{status.index_size} items, {workers} worker(s))")
        requests = {method: requests_for(method, users, item_ids, titles) for method in METHODS}
        samples = {method: getattr(stub, method)(requests[method][0], timeout=30).SerializeToString()
                   for method in METHODS}
        channel.close()
        own_addresses = [ranker.address] if workers == 1 else \
            [f"127.0.0.1:{r['address'].rsplit(':', 1)[-1]}" for r in registrations]
        warm_s = sum(warm_users(address, users) for address in own_addresses)
        progress(f"{spec}: user cache of {len(own_addresses)} process(es) warmed with {len(users)} users in {warm_s:.1f}s")
        server_pids = (lambda: [ranker.process.pid]) if workers == 1 else (lambda: child_pids(ranker.process.pid))
        metrics_ports = [ranker.metrics_port] if workers == 1 else ranker.worker_metrics_ports
        memory_after_warm_up = rss_mb(server_pids(), ranker.process.pid, workers)
        idle = idle_cpu_pct(server_pids())
        progress(f"{spec}: ranker CPU while idle {idle}% of a core (background threads; charged to every request below)")
        progress(f"{spec}: RSS after warm-up {memory_after_warm_up}")
        # The references, measured right after each level of the ranker with the same requests and
        # the same client: on this shared machine the load drifts over minutes, and a reference
        # measured at the end of the run compared the two under different loads (ratios swung
        # 0.2-0.8x). `echo`: one process, as always; `echo_n` (workers > 1): the same echo server
        # as `workers` processes on one SO_REUSEPORT port, the same shape as the ranker's.
        payload_env = {"BENCH_RANKER_ROLE": "echo", **{f"BENCH_ECHO_{m.upper()}": p.hex() for m, p in samples.items()}}
        echo = suite.start_script("ranker", payload_env, name=f"echo-{spec.replace(':', '-')}", timeout_s=60)
        processes.append(echo)
        references = {"echo": (echo.address, lambda: [echo.process.pid])}
        if workers > 1:
            from services.ranker.workers import reserve_shared_port
            holder = reserve_shared_port("127.0.0.1", 0)
            shared = holder.getsockname()[1]   # held (never listening) until the end of this catalog
            echo_n = [suite.start_script("ranker", {**payload_env, "BENCH_ECHO_PORT": str(shared)},
                                         name=f"echo-{workers}p-{i}-{spec.replace(':', '-')}", timeout_s=60)
                      for i in range(workers)]
            processes.extend(echo_n)
            references["echo_n"] = (f"127.0.0.1:{shared}", lambda: [e.process.pid for e in echo_n])
        result = {"items": len(item_ids), "users": len(users), "index_size": status.index_size,
                  "workers": workers, "connections": connections,
                  "index_kind": registration.get("index_kind"), "text_index_kind": registration.get("text_index_kind"),
                  "response_bytes": {method: len(sample) for method, sample in samples.items()},
                  "warm_up_s": round(warm_s, 1), "methods": {}, "rss_mb_after_warm_up": memory_after_warm_up,
                  "idle_cpu_pct": idle}
        for name in references:
            result[name] = {"response_bytes": {m: len(p) for m, p in samples.items()}, "methods": {},
                            "processes": 1 if name == "echo" else workers}
        for method in METHODS:
            by_level = result["methods"].setdefault(method, {})
            for concurrency in levels:
                sampler = None
                if concurrency == profile_level:
                    raw = suite.work_dir / f"profile-{spec.replace(':', '-')}-{method}-c{concurrency}.txt"
                    sampler = _profile.record(server_pids()[0], duration_s + warmup_s, raw)
                gc_before = gc_pauses(metrics_ports)
                figures = with_cpu(server_pids, lambda: run_load(ranker.address, method, requests[method], concurrency,
                                                                 duration_s, warmup_s, connections),
                                   duration_s, warmup_s)
                figures["gc"] = gc_pause_delta(gc_before, gc_pauses(metrics_ports))
                if sampler is not None:
                    sampler.wait(timeout=60)
                    profile = {"concurrency": concurrency, **_profile.summarise(raw)}
                    result.setdefault("profile", {})[method] = profile
                    progress(f"{spec}: {method} profile at concurrency {concurrency}: {profile.get('share_pct')}")
                by_level[str(concurrency)] = figures
                line = (f"{spec}: {method} c={concurrency}: {figures['rps']} req/s, p50 {figures['p50_ms']} ms, "
                        f"p99 {figures['p99_ms']} ms, errors {figures['errors']}, CPU/request "
                        f"{figures['cpu_us_per_request']} us (process shares {figures['cpu_shares']}), "
                        f"gc {figures['gc']}")
                for name, (address, pids) in references.items():
                    reference = with_cpu(pids, lambda: run_load(address, method, requests[method], concurrency,
                                                                duration_s, warmup_s, connections),
                                         duration_s, warmup_s)
                    result[name]["methods"].setdefault(method, {})[str(concurrency)] = reference
                    line += (f"; {name} {reference['rps']} req/s (p99 {reference['p99_ms']} ms, CPU "
                             f"{reference['cpu_us_per_request']} us): {_harness.ratio(figures['rps'], reference['rps'])}x")
                progress(line)
        result["rss_mb_after_runs"] = rss_mb(server_pids(), ranker.process.pid, workers)
        caches = []
        for rid in replica_ids:
            kv = etcd.get(__import__("services.contracts.etcd_keys", fromlist=["ranker_key"]).ranker_key(rid))
            caches.append(json.loads(kv.value).get("user_cache") if kv is not None else None)
        result["user_cache"] = caches[0] if workers == 1 else caches
        return result, samples
    finally:   # the next catalog gets the memory
        for process in reversed(processes):
            suite.stop(process, timeout_s=20)
        if holder is not None:
            holder.close()


def with_cpu(pids, load, duration_s: float, warmup_s: float) -> dict:
    """A load's figures plus the server's CPU per request (user + system of its processes,
    `pids()`, over the load, warm-up included; the warm-up's requests, not counted by run_load,
    scaled in at the measured rate): far steadier than req/s on the shared machine.
    `cpu_shares`: each process's part of that CPU (how evenly the connections spread)."""
    measured = pids()
    before = [process_cpu_s(pid) for pid in measured]
    figures = load()
    requests = max(figures["requests"] * (duration_s + warmup_s) / duration_s, 1.0)
    used = [process_cpu_s(pid) - b for pid, b in zip(measured, before)]
    figures["cpu_us_per_request"] = round(sum(used) / requests * 1e6, 1)
    figures["cpu_shares"] = [round(u / max(sum(used), 1e-9), 2) for u in used]
    return figures


def gc_pauses(ports: list[int]) -> dict:
    """The cyclic garbage collector's pauses so far in the ranker's processes (their
    deltarec_gc_pause_seconds, services/common/gc_pauses.py): per generation count and seconds,
    and how many pauses took 5 ms or more (a tail a request waiting on the GIL feels)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    totals: dict = {}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name != "deltarec_gc_pause_seconds":
                continue
            for sample in family.samples:
                generation = totals.setdefault(sample.labels.get("generation"), {"count": 0, "seconds": 0.0,
                                                                                 "le_5ms": 0})
                if sample.name.endswith("_count"):
                    generation["count"] += int(sample.value)
                elif sample.name.endswith("_sum"):
                    generation["seconds"] += sample.value
                elif sample.name.endswith("_bucket") and sample.labels.get("le") == "0.005":
                    generation["le_5ms"] += int(sample.value)
    return totals


def gc_pause_delta(before: dict, after: dict) -> dict:
    """Per generation: collections, their total ms and the pauses of 5 ms or more between two
    gc_pauses() snapshots."""
    delta = {}
    for generation, figures in sorted(after.items()):
        earlier = before.get(generation, {"count": 0, "seconds": 0.0, "le_5ms": 0})
        count = figures["count"] - earlier["count"]
        delta[generation] = {"count": count, "total_ms": round((figures["seconds"] - earlier["seconds"]) * 1e3, 1),
                             "over_5ms": count - (figures["le_5ms"] - earlier["le_5ms"])}
    return delta


def idle_cpu_pct(pids: list[int], seconds: float = 3.0) -> float:
    """The server processes' CPU with no request in flight, in % of one core: what background
    threads cost (it is in every level's CPU per request too)."""
    before = sum(process_cpu_s(pid) for pid in pids)
    time.sleep(seconds)
    return round((sum(process_cpu_s(pid) for pid in pids) - before) / seconds * 100, 1)


def child_pids(pid: int) -> list[int]:
    """The worker processes of a ranker supervisor (its children), in start order."""
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return sorted(int(child) for child in children.read().split())


def rss_mb(pids: list[int], supervisor_pid: int, workers: int) -> dict:
    """Resident memory of each server process (and the supervisor's, with workers), MB."""
    def rss(pid: int) -> float:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        return 0.0
    figures = {"processes": [rss(pid) for pid in pids]}
    if workers > 1:
        figures["supervisor"] = rss(supervisor_pid)
    figures["total"] = round(sum(figures["processes"]) + figures.get("supervisor", 0.0), 1)
    return figures


def wait_settled(etcd, replica_id: str, spec: str, timeout_s: float = 900.0) -> dict:
    """Waits until the replica's indexes are not being rebuilt (an HNSW index is first served
    flat while it builds in the background); returns its registration."""
    from services.contracts.etcd_keys import ranker_key
    began = time.perf_counter()
    last_log = 0.0
    while True:
        kv = etcd.get(ranker_key(replica_id))
        value = json.loads(kv.value) if kv is not None else {}
        if value and not value.get("rebuilding") and value.get("model_version") == 1:
            return value
        if time.perf_counter() - last_log > 15:
            last_log = time.perf_counter()
            progress(f"{spec}: waiting for background index builds ({time.perf_counter() - began:.0f}s)")
        if time.perf_counter() - began > timeout_s:
            raise RuntimeError("indexes still rebuilding")
        time.sleep(0.5)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def impression_path_cpu_us(answers: int = 20_000) -> dict:
    """CPU per answer of the impression path itself, in this process: Attribution.stamp (id +
    queued impression) and the flush's encoding of the batch (postgres_writer without the
    database), both process time, so far less sensitive to the machine's load than req/s."""
    import json as json_module
    from types import SimpleNamespace

    from services.feedback.attribution import Attribution
    from services.feedback.impressions import ImpressionBuffer
    answer = SimpleNamespace(model_version=1, variant="current",
                             items=[SimpleNamespace(item_id=f"B00{n:07d}") for n in range(10)])
    buffer = ImpressionBuffer(lambda batch: None, capacity=answers + 1)
    attribution = Attribution(buffer)
    began = time.process_time()
    for _ in range(answers):
        attribution.stamp(answer, "recommend", "A3NHUQ33CFH3VM")
    stamp_s = time.process_time() - began
    batch = list(buffer._queue)
    began = time.process_time()
    for start in range(0, len(batch), 1000):
        json_module.dumps([(i.recommendation_id, i.shown_at, i.user_id, i.model_version, i.variant, i.kind,
                            i.item_ids) for i in batch[start:start + 1000]], ensure_ascii=False, check_circular=False)
    encode_s = time.process_time() - began
    return {"stamp_us": round(stamp_s / answers * 1e6, 2), "flush_encoding_us": round(encode_s / answers * 1e6, 2)}


def bench_attribution(suite, spec: str, etcd, levels, duration_s: float, warmup_s: float, rounds: int,
                      max_users: int | None = None, extra_env: dict | None = None, profile: bool = False,
                      a_a: bool = False) -> dict:
    """Recommend req/s with attribution on and off, interleaved rounds (see the module docstring)."""
    import urllib.request

    import grpc

    from deltarec.v1 import ranker_pb2, ranker_pb2_grpc
    from tests import fakes

    dataset, vectors = _harness.bench_catalog(spec)
    item_ids = [item.item_id for item in dataset.items]
    users = list(dataset.sequences)
    if max_users is not None and len(users) > max_users:
        users = random.Random(5).sample(users, max_users)
    artifact = fakes.make_artifact(1, item_ids, vectors, dim=64, max_len=50, num_layers=2, popular=item_ids[:200])
    fakes.publish(etcd, fakes.store_artifact(suite.artifact_store(), artifact))
    del artifact
    processes = []
    try:
        stand_in = suite.start_features_stand_in(spec, name="features-stand-in-attribution")
        processes.append(stand_in)
        replicas = {}
        # a_a: both replicas without attribution (the same measurement's noise floor, for reading the ratio)
        for variant, setting in (("on", "false" if a_a else "true"), ("off", "false")):
            replica_id = f"bench-attr-{variant}-{uuid.uuid4().hex[:4]}"
            replicas[variant] = suite.start_ranker(stand_in.address, replica_id, name=f"ranker-attribution-{variant}",
                                                   database=True, RANKER_ATTRIBUTION=setting, **(extra_env or {}))
            processes.append(replicas[variant])
            wait_settled(etcd, replica_id, f"attribution {variant}")
        requests = requests_for("Recommend", users, item_ids, [])
        for variant, replica in replicas.items():
            with grpc.insecure_channel(replica.address) as channel:
                answer = ranker_pb2_grpc.RankerServiceStub(channel).Recommend(requests[0], timeout=30)
            assert bool(answer.recommendation_id) == (variant == "on" and not a_a), f"{variant}: recommendation_id"
            progress(f"attribution {variant}: user cache warmed in {warm_users(replica.address, users):.1f}s")
        totals = {variant: {str(level): {"requests": 0, "seconds": 0.0, "rounds_rps": [], "cpu_s": 0.0,
                                         "cpu_requests": 0.0} for level in levels}
                  for variant in replicas}
        round_ratios: dict[str, list] = {str(level): [] for level in levels}
        profiles: dict = {}
        for round_number in range(rounds):
            order = ("on", "off") if round_number % 2 == 0 else ("off", "on")
            for level in levels:
                measured = {}
                for variant in order:
                    sampler = None
                    if profile and round_number == 0 and level == levels[0]:
                        raw = suite.work_dir / f"profile-attribution-{variant}-c{level}.txt"
                        sampler = _profile.record(replicas[variant].process.pid, duration_s + warmup_s, raw)
                    cpu_before = process_cpu_s(replicas[variant].process.pid)
                    figures = run_load(replicas[variant].address, "Recommend", requests, level, duration_s, warmup_s)
                    if sampler is not None:
                        sampler.wait(timeout=60)
                        profiles[variant] = {"concurrency": level, **_profile.summarise(raw)}
                        progress(f"attribution {variant} profile: {profiles[variant].get('share_pct')}")
                    measured[variant] = figures
                    entry = totals[variant][str(level)]
                    entry["requests"] += figures["requests"]
                    entry["seconds"] += duration_s
                    entry["rounds_rps"].append(figures["rps"])
                    time.sleep(1.5)     # the "on" replica's last impressions are flushed before the next load
                    # CPU of the load, its warm-up and the flush after it; the warm-up's requests
                    # are not counted by run_load: scaled in at the measured rate.
                    entry["cpu_s"] += process_cpu_s(replicas[variant].process.pid) - cpu_before
                    entry["cpu_requests"] += figures["requests"] * (duration_s + warmup_s) / duration_s
                round_ratios[str(level)].append(_harness.ratio(measured["on"]["rps"], measured["off"]["rps"]))
                progress(f"attribution round {round_number + 1}/{rounds} c={level}: on {measured['on']['rps']} req/s "
                         f"(p99 {measured['on']['p99_ms']} ms), off {measured['off']['rps']} req/s "
                         f"(p99 {measured['off']['p99_ms']} ms)")
        time.sleep(2.0)
        with suite.connect() as connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM impressions")
            written = int(cursor.fetchone()[0])
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{replicas['on'].metrics_port}/metrics",
                                         timeout=10).read().decode()
        dropped = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("deltarec_impressions_dropped_total{"))
        result = {"catalog": spec, "users": len(users), "rounds": rounds, "duration_s_per_round": duration_s,
                  "a_a": a_a,
                  "impressions_written": written, "impressions_dropped": int(dropped), "levels": {}}
        for level in levels:
            on, off = totals["on"][str(level)], totals["off"][str(level)]
            on_rps, off_rps = round(on["requests"] / on["seconds"], 1), round(off["requests"] / off["seconds"], 1)
            on_cpu_us = round(on["cpu_s"] / max(on["cpu_requests"], 1) * 1e6, 1)
            off_cpu_us = round(off["cpu_s"] / max(off["cpu_requests"], 1) * 1e6, 1)
            result["levels"][str(level)] = {"on_rps": on_rps, "off_rps": off_rps, "ratio": _harness.ratio(on_rps, off_rps),
                                            "on_cpu_us_per_request": on_cpu_us, "off_cpu_us_per_request": off_cpu_us,
                                            "cpu_per_request_ratio": _harness.ratio(on_cpu_us, off_cpu_us),
                                            "median_round_ratio": round(float(np.median(round_ratios[str(level)])), 3),
                                            "round_ratios": round_ratios[str(level)],
                                            "on_rounds_rps": on["rounds_rps"], "off_rounds_rps": off["rounds_rps"]}
        path = impression_path_cpu_us()
        off_cpu = min(level["off_cpu_us_per_request"] for level in result["levels"].values())
        result["impression_path_cpu_us_per_answer"] = {
            **path, "share_of_recommend_cpu": _harness.ratio(path["stamp_us"] + path["flush_encoding_us"], off_cpu)}
        progress(f"attribution: impression path {path} us per answer, vs {off_cpu} us of ranker CPU per Recommend")
        if profiles:
            result["profile"] = profiles
        result["ratio_min"] = min(level["ratio"] for level in result["levels"].values())
        result["target_ratio"] = TARGET_ATTRIBUTION_RATIO
        result["meets_target"] = result["ratio_min"] >= TARGET_ATTRIBUTION_RATIO
        ratios = ", ".join(f"c={level} {figures['ratio']}" for level, figures in result["levels"].items())
        progress(f"attribution: on/off {ratios}, {written} impressions written, {int(dropped)} dropped")
        return result
    finally:
        for process in reversed(processes):
            suite.stop(process, timeout_s=20)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="< 60 s: shorter runs, smaller crossover")
    parser.add_argument("--synthetic-items", type=int, default=100_000)
    parser.add_argument("--index", choices=("auto", "flat", "hnsw"), default="auto",
                        help="RANKER_INDEX of the ranker under test")
    parser.add_argument("--only", choices=("beauty", "synthetic", "crossover", "attribution"), default=None,
                        help="run one part only (development)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the ranker under test (development)")
    parser.add_argument("--attribution-a-a", action="store_true",
                        help="attribution part with both replicas off: the noise floor of its ratio")
    parser.add_argument("--profile", action="store_true",
                        help="sample the ranker with py-spy at concurrency 8 and report where its CPU goes")
    parser.add_argument("--workers", type=int, default=1,
                        help="RANKER_WORKERS of the ranker under test; > 1 adds the echo_n reference "
                             "(the echo server as that many processes on one SO_REUSEPORT port)")
    parser.add_argument("--connections", type=int, default=None,
                        help="client connections the load is spread over, the same for the ranker and "
                             "every reference (default 1; 8 with --workers > 1: SO_REUSEPORT spreads "
                             "connections, not requests)")
    args = parser.parse_args(argv)
    connections = args.connections or (1 if args.workers == 1 else 8)
    if args.profile and not _profile.available():
        parser.error("--profile needs py-spy (.venv/bin/pip install py-spy)")
    profile_level = 8 if args.profile else None
    extra_env = dict(item.split("=", 1) for item in args.env)
    duration_s, warmup_s = (1.5, 0.3) if args.quick else (10.0, 2.0)
    summary: dict = {"benchmark": "ranker", "quick": args.quick, "duration_s_per_level": duration_s,
                     "reference": "bare gRPC echo server (grpc.server, 16 threads, no interceptor) returning a "
                                  "RecommendResponse of the same bytes as the ranker's, same client",
                     "setup": "real ranker process; features stand-in process (WatchItems/GetUserFeatures from "
                              "memory) instead of collector+Postgres+features; untrained model of production "
                              "shape built here and published via etcd; random unit text vectors",
                     "target_ratio": TARGET_RATIO, "target_p99_ms": TARGET_P99_MS}
    summary.update(workers=args.workers, connections=connections)
    max_users = 3000 if args.quick else None
    with _harness.Suite("ranker") as suite:
        etcd = suite.etcd()
        catalogs = {}
        payloads = requests = None
        if args.only in (None, "beauty"):
            catalogs["beauty"], payloads = bench_one_catalog(suite, "beauty", etcd, LEVELS, duration_s, warmup_s,
                                                             extra_env={"RANKER_INDEX": args.index, **extra_env},
                                                             profile_level=profile_level, max_users=max_users,
                                                             workers=args.workers, connections=connections)
        if args.only in (None, "synthetic"):
            spec = f"synthetic:{args.synthetic_items}"
            name = f"synthetic_{args.synthetic_items // 1000}k"
            # --quick keeps the flat index (no background HNSW builds to wait for) unless --index
            # says otherwise; the full run measures the default (auto: HNSW above the thresholds,
            # once built) and flat.
            quick_kind = "flat" if args.index == "auto" else args.index
            variants = [(quick_kind, {"RANKER_INDEX": quick_kind})] if args.quick else \
                [(args.index, {"RANKER_INDEX": args.index}), ("flat", {"RANKER_INDEX": "flat"})]
            for label, extra in variants:
                key = name if label == variants[0][0] else f"{name}_{label}"
                catalogs[key], synthetic_payloads = bench_one_catalog(
                    suite, spec, etcd, LEVELS, duration_s, warmup_s, extra_env={**extra, **extra_env},
                    profile_level=profile_level, max_users=max_users, workers=args.workers,
                    connections=connections)
                catalogs[key]["ranker_index_setting"] = label
                payloads = payloads or synthetic_payloads
                if label == "flat" and args.index == "flat":
                    break
        summary["catalogs"] = catalogs
        if args.only in (None, "attribution"):
            # Many short alternations: on this shared machine one round's ratio swings 0.5-1.7x
            # with the load (measured), far more than the cost looked for.
            rounds, round_s = (8, 1.5) if args.quick else (12, 5.0)
            summary["attribution"] = bench_attribution(
                suite, "beauty", etcd, ATTRIBUTION_LEVELS, round_s, warmup_s, rounds,
                max_users=max_users, extra_env={"RANKER_INDEX": args.index, **extra_env}, profile=args.profile,
                a_a=args.attribution_a_a)
            if args.only == "attribution":
                _harness.print_summary(summary)
                return 0
        if args.only == "crossover":
            summary["crossover"] = crossover([10_000, 25_000, 50_000, 75_000, 100_000, 200_000], [64, 384], 300)
            _harness.print_summary(summary)
            return 0
        # Each catalog's reference is its own echo server, measured level by level with it.
        summary["echo"] = {name: figures["echo"] for name, figures in catalogs.items()}
        ratios = {}
        for name, figures in catalogs.items():
            ratios[name] = {method: {level: _harness.ratio(by_level[level]["rps"],
                                                           figures["echo"]["methods"][method][level]["rps"])
                                     for level in by_level}
                            for method, by_level in figures["methods"].items()}
        summary["ratio"] = ratios
        if args.workers > 1:
            # against the echo server in the ranker's own shape (N processes on one port)
            summary["ratio_echo_n"] = {name: {method: {level: _harness.ratio(
                by_level[level]["rps"], figures["echo_n"]["methods"][method][level]["rps"]) for level in by_level}
                for method, by_level in figures["methods"].items()} for name, figures in catalogs.items()}
            summary["ratio_echo_n_min"] = min(r for by_method in summary["ratio_echo_n"].values()
                                              for r in by_method["Recommend"].values())
        # echo's CPU per request / the ranker's: the req/s ratio the pair would show if both were
        # bound by their own CPU alone (each server is one Python process, so GIL-bound near one core)
        summary["cpu_ratio"] = {name: {method: {level: _harness.ratio(
            figures["echo"]["methods"][method][level]["cpu_us_per_request"], by_level[level]["cpu_us_per_request"])
            for level in by_level} for method, by_level in figures["methods"].items()}
            for name, figures in catalogs.items()}
        recommend = [figures["methods"]["Recommend"] for figures in catalogs.values()]
        summary["ratio_min"] = min(r for by_method in ratios.values() for r in by_method["Recommend"].values())
        summary["p99_max_ms"] = max(level["p99_ms"] for by_level in recommend
                                    for name, level in by_level.items() if name in ("8", "32"))
        summary["errors"] = sum(sum(level["errors"].values()) for figures in catalogs.values()
                                for by_level in figures["methods"].values() for level in by_level.values())
        summary["meets_target"] = summary["ratio_min"] >= TARGET_RATIO and summary["p99_max_ms"] < TARGET_P99_MS
        if args.workers > 1:
            summary["meets_target_vs_echo_n"] = (summary["ratio_echo_n_min"] >= TARGET_RATIO
                                                 and summary["p99_max_ms"] < TARGET_P99_MS)
        if args.only:
            pass
        elif args.quick:
            summary["crossover"] = crossover([10_000, 20_000, 40_000], [64], queries=100)
        else:
            summary["crossover"] = crossover([10_000, 25_000, 50_000, 75_000, 100_000, 150_000, 200_000], [64],
                                             queries=300)
            summary["crossover"].update(crossover([10_000, 25_000, 50_000, 100_000], [384], queries=300))
    _harness.print_summary(summary)
    return 0


if __name__ == "__main__":
    if ROLE == "echo":
        serve_echo()
    else:
        sys.exit(main())
