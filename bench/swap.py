"""Hot swap under load: time from publishing a model version to every ranker replica serving it,
and requests that failed meanwhile (target 0).

    .venv/bin/python bench/swap.py            # full: 10 swaps
    .venv/bin/python bench/swap.py --quick    # < 60 s: 3 swaps

Two real ranker replicas (python -m services.ranker through scripts/launch.py) serve the Amazon
Beauty catalog (12k items) from a features stand-in process (services/ranker/devtools.py: the
catalog and the users' histories from memory instead of collector + Postgres + features), etcd
through scripts/infra.py (state in .run/bench-infra, stopped at the end only if this run started
it). A client sends Recommend to both replicas without pause (8 concurrent requests, random
users) during the whole run. Each new version is an artifact of the production shape (dim 64,
2 layers, untrained weights) written to a file:// artifact store before the clock starts; the
clock starts at the compare-and-swap of `model/current` (exactly what the trainer does) and
stops when both replicas' Status report the version.

Progress goes to stderr; the LAST stdout line is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT, REPO_ROOT / "gen"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from deltarec.v1 import ranker_pb2, ranker_pb2_grpc  # noqa: E402
from scripts import infra  # noqa: E402
from scripts.launch import ServiceProcess  # noqa: E402
from services.common.artifacts import ArtifactStore  # noqa: E402
from services.common.etcd import Etcd  # noqa: E402
from services.ranker import devtools  # noqa: E402

INFRA_DIR = REPO_ROOT / ".run" / "bench-infra"
WORK_DIR = REPO_ROOT / ".run" / "bench-swap"


def progress(message: str) -> None:
    print(f"[bench/swap] {message}", file=sys.stderr, flush=True)


class Load:
    """Recommend without pause against several replicas from a background thread."""

    def __init__(self, addresses: list[str], users: list[str], concurrency: int) -> None:
        self.addresses, self.users, self.concurrency = addresses, users, concurrency
        self.stop = threading.Event()
        self.ok = 0
        self.failures: dict[str, int] = {}
        self.versions: dict[str, int] = {}       # replica address -> last version seen
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        channels = [grpc.aio.insecure_channel(address) for address in self.addresses]
        calls = [channel.unary_unary("/deltarec.v1.RankerService/Recommend",
                                     request_serializer=ranker_pb2.RecommendRequest.SerializeToString,
                                     response_deserializer=ranker_pb2.RecommendResponse.FromString)
                 for channel in channels]

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while not self.stop.is_set():
                target = rng.randrange(len(calls))
                try:
                    response = await calls[target](ranker_pb2.RecommendRequest(
                        user_id=self.users[rng.randrange(len(self.users))], k=10), timeout=10)
                    self.ok += 1
                    self.versions[self.addresses[target]] = response.freshness.model_version
                except grpc.aio.AioRpcError as error:
                    self.failures[error.code().name] = self.failures.get(error.code().name, 0) + 1

        await asyncio.gather(*(worker(seed) for seed in range(self.concurrency)))
        for channel in channels:
            await channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="< 60 s: 3 swaps")
    parser.add_argument("--swaps", type=int, default=None)
    parser.add_argument("--catalog", default="beauty", help="beauty or synthetic:N")
    args = parser.parse_args(argv)
    swaps = args.swaps or (3 if args.quick else 10)
    wall = time.perf_counter()
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    logs = WORK_DIR / "logs"
    started_infra = not infra.running(INFRA_DIR)
    infra_env = infra.start(INFRA_DIR)
    progress(f"infrastructure {'started' if started_infra else 'reused'} in {INFRA_DIR}")
    prefix = f"/bench-swap-{uuid.uuid4().hex[:8]}/"
    etcd = Etcd(infra_env.etcd_endpoint, prefix)
    store = ArtifactStore((WORK_DIR / "artifacts").as_uri())
    processes: list[ServiceProcess] = []
    summary: dict = {"benchmark": "swap", "quick": args.quick, "catalog": args.catalog, "replicas": 2,
                     "reference": "publish (CAS of model/current) -> both replicas' Status report the version",
                     "setup": "real ranker processes; features stand-in (catalog + histories from memory); "
                              "untrained artifacts of production shape; 8 concurrent Recommend without pause",
                     "target_failed_requests": 0}
    try:
        dataset, vectors = devtools.bench_catalog(args.catalog)
        item_ids = [item.item_id for item in dataset.items]
        users = list(dataset.sequences)

        def artifact(version: int) -> dict:
            built = devtools.make_artifact(version, item_ids, vectors, dim=64, max_len=50, num_layers=2,
                                           popular=item_ids[:200])
            return devtools.store_artifact(store, built, name=f"swap-v{version}.pt")

        devtools.publish(etcd, artifact(1))
        stand_in = ServiceProcess("bench.ranker", {"BENCH_RANKER_ROLE": "features", "BENCH_CATALOG": args.catalog},
                                  name="features-stand-in", log_dir=logs).start(300)
        processes.append(stand_in)
        env = {"DATABASE_URL": infra_env.database_url, "ETCD_ENDPOINT": infra_env.etcd_endpoint,
               "ETCD_PREFIX": prefix, "GRPC_PORT": "0", "METRICS_PORT": "0", "LOG_LEVEL": "WARNING",
               "SHUTDOWN_GRACE_S": "1", "FEATURES_ADDRESS": stand_in.address}
        replicas = []
        for name in ("a", "b"):
            replica = ServiceProcess("services.ranker", {**env, "RANKER_REPLICA_ID": f"bench-swap-{name}"},
                                     name=f"ranker-{name}", log_dir=logs).start(600)
            processes.append(replica)
            replicas.append(replica)
        stubs = [ranker_pb2_grpc.RankerServiceStub(grpc.insecure_channel(r.address)) for r in replicas]

        def versions() -> list[int]:
            return [stub.Status(ranker_pb2.RankerServiceStatusRequest(), timeout=10).freshness.model_version
                    for stub in stubs]
        progress(f"2 replicas serving {len(item_ids)} items, versions {versions()}")
        load = Load([r.address for r in replicas], users, concurrency=8)
        load.thread.start()
        time.sleep(1.0)
        times = []
        for version in range(2, swaps + 2):
            spec = artifact(version)
            published = time.perf_counter()
            devtools.publish(etcd, spec)
            while versions() != [version, version]:
                if time.perf_counter() - published > 120:
                    raise RuntimeError(f"version {version} not served after 120 s")
                time.sleep(0.005)
            elapsed = time.perf_counter() - published
            times.append(elapsed)
            progress(f"v{version}: every replica serving after {elapsed * 1000:.0f} ms; "
                     f"{load.ok} requests ok, failures {load.failures}")
            time.sleep(0.5)
        load.stop.set()
        load.thread.join(30)
        values = np.array(times) * 1000
        summary.update({
            "swaps": swaps,
            "publish_to_all_serving_ms": {"p50": round(float(np.percentile(values, 50)), 1),
                                          "max": round(float(values.max()), 1),
                                          "all": [round(float(v), 1) for v in values]},
            "requests_ok": load.ok, "failed_requests": sum(load.failures.values()), "failures": load.failures,
            "items": len(item_ids)})
        summary["meets_target"] = summary["failed_requests"] == 0
    finally:
        for process in reversed(processes):
            process.stop(timeout_s=20)
        etcd.close()
        if started_infra:
            infra.stop(INFRA_DIR)
    summary["wall_s"] = round(time.perf_counter() - wall, 1)
    summary["load_average_1m"] = round(os.getloadavg()[0], 2)   # other work on the machine
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
