"""Hot swap under load: time from publishing a model version to every ranker replica serving it,
and requests that failed meanwhile (target 0).

    .venv/bin/python bench/swap.py            # full: 10 swaps
    .venv/bin/python bench/swap.py --quick    # < 60 s: 3 swaps

Two real ranker replicas (python -m services.ranker, started by bench/_harness.py) serve the
Amazon Beauty catalog (12k items) from a features stand-in process (tests/fakes.py: the catalog
and the users' histories from memory instead of collector + Postgres + features), etcd through
scripts/infra.py. A client sends Recommend to both replicas without pause (8 concurrent requests, random
users) during the whole run. Each new version is an artifact of the production shape (dim 64,
2 layers, untrained weights) written to a file:// artifact store before the clock starts; the
clock starts at the compare-and-swap of `model/current` (exactly what the trainer does) and
stops when both replicas' Status report the version.

Progress goes to stderr; the LAST stdout line is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time

import grpc

import _harness
from _harness import progress
from deltarec.v1 import ranker_pb2, ranker_pb2_grpc
from tests import fakes


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
    summary: dict = {"benchmark": "swap", "quick": args.quick, "catalog": args.catalog, "replicas": 2,
                     "reference": "publish (CAS of model/current) -> both replicas' Status report the version",
                     "setup": "real ranker processes; features stand-in (catalog + histories from memory); "
                              "untrained artifacts of production shape; 8 concurrent Recommend without pause",
                     "target_failed_requests": 0}
    with _harness.Suite("swap") as suite:
        etcd, store = suite.etcd(), suite.artifact_store()
        dataset, vectors = _harness.bench_catalog(args.catalog)
        item_ids = [item.item_id for item in dataset.items]
        users = list(dataset.sequences)

        def artifact(version: int) -> dict:
            built = fakes.make_artifact(version, item_ids, vectors, dim=64, max_len=50, num_layers=2,
                                        popular=item_ids[:200])
            return fakes.store_artifact(store, built)

        fakes.publish(etcd, artifact(1))
        stand_in = suite.start_features_stand_in(args.catalog, name="features-stand-in")
        replicas = [suite.start_ranker(stand_in.address, f"bench-swap-{name}", name=f"ranker-{name}",
                                       database=False) for name in ("a", "b")]
        stubs = [ranker_pb2_grpc.RankerServiceStub(grpc.insecure_channel(r.address)) for r in replicas]

        def versions() -> list[int]:
            return [stub.Status(ranker_pb2.RankerServiceStatusRequest(), timeout=10).freshness.model_version
                    for stub in stubs]
        progress(f"2 replicas serving {len(item_ids)} items, versions {versions()}")
        load = Load([r.address for r in replicas], users, concurrency=8)
        load.thread.start()
        time.sleep(1.0)
        times = []
        try:
            for version in range(2, swaps + 2):
                spec = artifact(version)
                published = time.perf_counter()
                fakes.publish(etcd, spec)
                while versions() != [version, version]:
                    if time.perf_counter() - published > 120:
                        raise RuntimeError(f"version {version} not served after 120 s")
                    time.sleep(0.005)
                elapsed = time.perf_counter() - published
                times.append(elapsed)
                progress(f"v{version}: every replica serving after {elapsed * 1000:.0f} ms; "
                         f"{load.ok} requests ok, failures {load.failures}")
                time.sleep(0.5)
        finally:
            load.stop.set()
            load.thread.join(30)
        figures = _harness.percentiles(times, scale=1000, digits=1)
        summary.update({
            "swaps": swaps,
            "publish_to_all_serving_ms": {"p50": figures["p50"], "max": figures["max"],
                                          "all": [round(float(v) * 1000, 1) for v in times]},
            "requests_ok": load.ok, "failed_requests": sum(load.failures.values()), "failures": load.failures,
            "items": len(item_ids)})
        summary["meets_target"] = summary["failed_requests"] == 0
    _harness.print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
