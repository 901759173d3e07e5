"""New item freshness: from UpsertItems at the collector to the item being the top Search result
for its exact title at a ranker, through the whole pipeline, with no model update.

    .venv/bin/python bench/new_item.py            # full: 40 items
    .venv/bin/python bench/new_item.py --quick    # < 60 s: 10 items

Everything is real: Postgres and etcd through scripts/infra.py (state in .run/bench-infra,
stopped at the end only if this run started them; a fresh database), the collector, the
features service (logical replication delta stream, MiniLM embedding of the new title) and one
ranker (WatchItems -> catalog, text index, lexical index, model index), each a process started
through scripts/launch.py. A starting catalog of 300 synthetic items and a model (untrained,
production shape) published to etcd as the trainer does. Then, one at a time, a new item with a
unique title is upserted and Search is polled every 10 ms until that item is the first result;
the model version must not change meanwhile.

Progress goes to stderr; the LAST stdout line is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT, REPO_ROOT / "gen"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from deltarec.v1 import collector_pb2, collector_pb2_grpc, common_pb2, ranker_pb2, ranker_pb2_grpc  # noqa: E402
from scripts import infra  # noqa: E402
from scripts.launch import ServiceProcess  # noqa: E402
from services.common import datasets, db  # noqa: E402
from services.common.artifacts import ArtifactStore  # noqa: E402
from services.common.etcd import Etcd  # noqa: E402
from services.ranker import devtools  # noqa: E402

INFRA_DIR = REPO_ROOT / ".run" / "bench-infra"
WORK_DIR = REPO_ROOT / ".run" / "bench-new-item"
WORDS = ["Quillon", "Marigold", "Vetiver", "Obsidian", "Saffron", "Juniper", "Azure", "Tamarind", "Nimbus",
         "Cobalt", "Ember", "Lagoon"]
KINDS = ["Cuticle Elixir", "Beard Balm", "Lip Tint", "Scalp Serum", "Body Butter", "Eye Gel"]


def progress(message: str) -> None:
    print(f"[bench/new_item] {message}", file=sys.stderr, flush=True)


def admin_url(database_url: str) -> str:
    return database_url.rsplit("/", 1)[0] + "/postgres"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="< 60 s: 10 items")
    parser.add_argument("--items", type=int, default=None)
    args = parser.parse_args(argv)
    count = args.items or (10 if args.quick else 40)
    wall = time.perf_counter()
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    logs = WORK_DIR / "logs"
    started_infra = not infra.running(INFRA_DIR)
    infra_env = infra.start(INFRA_DIR)
    progress(f"infrastructure {'started' if started_infra else 'reused'} in {INFRA_DIR}")
    name = f"bench_new_item_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url(infra_env.database_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    database_url = infra_env.database_url.rsplit("/", 1)[0] + f"/{name}"
    db.migrate(database_url)
    prefix = f"/bench-new-item-{uuid.uuid4().hex[:8]}/"
    etcd = Etcd(infra_env.etcd_endpoint, prefix)
    processes: list[ServiceProcess] = []
    summary: dict = {"benchmark": "new_item", "quick": args.quick,
                     "reference": "UpsertItems returned -> the item is Search's first result for its exact title",
                     "setup": "real collector, features (MiniLM), ranker, Postgres logical replication, etcd; "
                              "300-item starting catalog; model published once, never updated"}
    try:
        env = {"DATABASE_URL": database_url, "ETCD_ENDPOINT": infra_env.etcd_endpoint, "ETCD_PREFIX": prefix,
               "GRPC_PORT": "0", "METRICS_PORT": "0", "LOG_LEVEL": "WARNING", "SHUTDOWN_GRACE_S": "1",
               "COLLECTOR_HEARTBEAT_S": "0.5"}
        collector_process = ServiceProcess("services.collector", env, name="collector", log_dir=logs).start(120)
        processes.append(collector_process)
        collector = collector_pb2_grpc.CollectorServiceStub(grpc.insecure_channel(collector_process.address))
        catalog = datasets.synthetic(n_items=300, n_users=50, seed=3)
        collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=[
            common_pb2.Item(item_id=item.item_id, title=item.title, category=item.category, brand=item.brand,
                            active=True) for item in catalog.items]), timeout=60)
        item_ids = [item.item_id for item in catalog.items]
        spec = devtools.store_artifact(ArtifactStore((WORK_DIR / "artifacts").as_uri()), devtools.make_artifact(
            1, item_ids, devtools.text_vectors([item.title for item in catalog.items]), dim=64, max_len=50,
            num_layers=2), name=f"{name}.pt")
        devtools.publish(etcd, spec)
        features = ServiceProcess("services.features", {**env, "COLLECTOR_ADDRESS": collector_process.address,
                                                        "FEATURES_TORCH_THREADS": "1"},
                                  name="features", log_dir=logs).start(300)
        processes.append(features)
        ranker_process = ServiceProcess("services.ranker", {**env, "FEATURES_ADDRESS": features.address,
                                                            "RANKER_REPLICA_ID": "bench-new-item"},
                                        name="ranker", log_dir=logs).start(300)
        processes.append(ranker_process)
        ranker = ranker_pb2_grpc.RankerServiceStub(grpc.insecure_channel(ranker_process.address))
        while True:   # features may still be applying the starting catalog
            status = ranker.Status(ranker_pb2.RankerServiceStatusRequest(), timeout=10)
            if status.index_size >= len(item_ids):
                break
            if time.perf_counter() - wall > 240:
                raise RuntimeError(f"the ranker has {status.index_size} of {len(item_ids)} items after 240 s")
            time.sleep(0.1)
        progress(f"pipeline up in {time.perf_counter() - wall:.1f}s: ranker has {status.index_size} items, "
                 f"model v{status.freshness.model_version}")
        latencies = []
        for n in range(count):
            token = uuid.uuid4().hex[:6]
            item_id = f"new-{token}"
            title = f"{WORDS[n % len(WORDS)]} {WORDS[(n * 5 + 3) % len(WORDS)]} {KINDS[n % len(KINDS)]} {token}"
            started = time.perf_counter()
            collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=[common_pb2.Item(
                item_id=item_id, title=title, category="Beauty", brand=WORDS[n % len(WORDS)], active=True)]),
                timeout=30)
            while True:
                response = ranker.Search(ranker_pb2.SearchRequest(query=title, k=3), timeout=10)
                if response.items and response.items[0].item_id == item_id:
                    break
                if time.perf_counter() - started > 120:
                    raise RuntimeError(f"{item_id} not found after 120 s")
                time.sleep(0.01)
            latencies.append(time.perf_counter() - started)
            if response.freshness.model_version != 1:
                raise RuntimeError("the model changed during the benchmark")
            progress(f"{item_id}: found after {latencies[-1] * 1000:.0f} ms")
        values = np.array(latencies) * 1000
        summary.update({"items": count,
                        "upsert_to_found_ms": {"p50": round(float(np.percentile(values, 50)), 1),
                                               "p95": round(float(np.percentile(values, 95)), 1),
                                               "max": round(float(values.max()), 1)},
                        "model_version_unchanged": True})
    finally:
        for process in reversed(processes):
            process.stop(timeout_s=20)
        etcd.close()
        try:
            with admin.connect() as connection:
                connection.execute(sa.text(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = :name"),
                    {"name": name})
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except Exception as error:  # noqa: BLE001
            progress(f"could not drop database {name}: {error}")
        admin.dispose()
        if started_infra:
            infra.stop(INFRA_DIR)
    summary["wall_s"] = round(time.perf_counter() - wall, 1)
    summary["load_average_1m"] = round(os.getloadavg()[0], 2)   # other work on the machine
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
