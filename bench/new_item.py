"""New item freshness: from UpsertItems at the collector to the item being the top Search result
for its exact title at a ranker, through the whole pipeline, with no model update.

    .venv/bin/python bench/new_item.py            # full: 40 items
    .venv/bin/python bench/new_item.py --quick    # < 60 s: 10 items

Everything is real (started by bench/_harness.py: Postgres and etcd through scripts/infra.py,
a fresh database): the collector, the features service (logical replication delta stream,
MiniLM embedding of the new title) and one ranker (WatchItems -> catalog, text index, lexical
index, model index), each a process. A starting catalog of 300 synthetic items and a model (untrained,
production shape) published to etcd as the trainer does. Then, one at a time, a new item with a
unique title is upserted and Search is polled every 10 ms until that item is the first result;
the model version must not change meanwhile.

Progress goes to stderr; the LAST stdout line is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import sys
import time
import uuid

import grpc

import _harness
from _harness import progress
from deltarec.v1 import collector_pb2, collector_pb2_grpc, common_pb2, ranker_pb2, ranker_pb2_grpc
from scripts import datasets
from tests import fakes

WORDS = ["Quillon", "Marigold", "Vetiver", "Obsidian", "Saffron", "Juniper", "Azure", "Tamarind", "Nimbus",
         "Cobalt", "Ember", "Lagoon"]
KINDS = ["Cuticle Elixir", "Beard Balm", "Lip Tint", "Scalp Serum", "Body Butter", "Eye Gel"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="< 60 s: 10 items")
    parser.add_argument("--items", type=int, default=None)
    args = parser.parse_args(argv)
    count = args.items or (10 if args.quick else 40)
    summary: dict = {"benchmark": "new_item", "quick": args.quick,
                     "reference": "UpsertItems returned -> the item is Search's first result for its exact title",
                     "setup": "real collector, features (MiniLM), ranker, Postgres logical replication, etcd; "
                              "300-item starting catalog; model published once, never updated"}
    with _harness.Suite("new_item") as suite:
        collector_process = suite.start_collector(COLLECTOR_HEARTBEAT_S="0.5")
        collector = collector_pb2_grpc.CollectorServiceStub(grpc.insecure_channel(collector_process.address))
        catalog = datasets.synthetic(n_items=300, n_users=50, seed=3)
        collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=[
            common_pb2.Item(item_id=item.item_id, title=item.title, category=item.category, brand=item.brand,
                            active=True) for item in catalog.items]), timeout=60)
        item_ids = [item.item_id for item in catalog.items]
        spec = fakes.store_artifact(suite.artifact_store(), fakes.make_artifact(
            1, item_ids, fakes.text_vectors([item.title for item in catalog.items]), dim=64, max_len=50,
            num_layers=2))
        fakes.publish(suite.etcd(), spec)
        features = suite.start_features(collector_process, FEATURES_TORCH_THREADS="1")
        ranker_process = suite.start_ranker(features.address, "bench-new-item", name="ranker", timeout_s=300)
        ranker = ranker_pb2_grpc.RankerServiceStub(grpc.insecure_channel(ranker_process.address))
        began = time.perf_counter()
        while True:   # features may still be applying the starting catalog
            status = ranker.Status(ranker_pb2.RankerServiceStatusRequest(), timeout=10)
            if status.index_size >= len(item_ids):
                break
            if time.perf_counter() - began > 240:
                raise RuntimeError(f"the ranker has {status.index_size} of {len(item_ids)} items after 240 s")
            time.sleep(0.1)
        progress(f"pipeline up: ranker has {status.index_size} items, model v{status.freshness.model_version}")
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
        figures = _harness.percentiles(latencies, scale=1000, digits=1)
        summary.update({"items": count,
                        "upsert_to_found_ms": {key: figures[key] for key in ("p50", "p95", "max")},
                        "model_version_unchanged": True})
    _harness.print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
