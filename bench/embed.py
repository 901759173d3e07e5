"""Embedding throughput: items/s through the features service on a bulk catalog load, vs the bare
model on the same texts in the same run.

    .venv/bin/python bench/embed.py            # full: the whole Amazon Beauty catalog (~12k titles)
    .venv/bin/python bench/embed.py --quick    # < 60 s: the first 400 titles

Starts what it needs by itself (bench/_harness.py): Postgres and etcd through scripts/infra.py,
a fresh database, a collector and a features service.

- Bare model: TextEncoder.encode(texts, batch_size=64) in this process, with the same number of
  torch threads as the service, on exactly the texts the service embeds (`embedding_text` of
  each item), after a warm-up. Measured before and after the service run; the reference is the
  mean of the two (the machine is shared: this halves the effect of a load change).
- Service: the catalog goes in through the collector's UpsertItems (batches of 500, as
  `make run` does), flows through Postgres logical replication and the delta stream, and is
  embedded and stored by the features service. Timed from the first UpsertItems call until
  Status.embeddings_computed has grown by the number of items (the service was warmed up on a few
  other items first).
`ratio` = service items/s / bare items/s (target >= 0.9). The machine may be shared, and wall time
then depends on what else runs; `cpu_ratio` = bare CPU per item / (features + collector) CPU per
item is the same comparison in CPU time, which other work hardly affects.

Progress goes to stderr; the LAST stdout line is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import grpc

import _harness
from _harness import progress
from deltarec.v1 import collector_pb2_grpc, common_pb2, features_pb2, features_pb2_grpc
from scripts import datasets
from services.contracts.item_text import ItemText, embedding_text

QUICK_ITEMS = 400
WARMUP_ITEMS = 64
LOAD_BATCH = 500
TARGET_RATIO = 0.9


def catalog(limit: int | None) -> tuple[str, list[common_pb2.Item]]:
    data = datasets.load_default(max_users=1)
    return data.name, _harness.catalog_messages(data.items[:limit] if limit else data.items)


def model_texts(items: list[common_pb2.Item]) -> list[str]:
    return [embedding_text(ItemText(i.title, i.description, i.category, i.brand)) for i in items]


def bare_run(encoder, texts: list[str]) -> tuple[float, float]:
    """(items/s, CPU seconds per item) of the bare model in this process."""
    started, cpu_started = time.perf_counter(), time.process_time()
    encoder.encode(texts, batch_size=64)
    return len(texts) / (time.perf_counter() - started), (time.process_time() - cpu_started) / len(texts)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"first {QUICK_ITEMS} titles, under 60 s")
    parser.add_argument("--items", type=int, default=None, help="number of catalog items (default: all)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads, for both the service and the bare model")
    parser.add_argument("--infra-dir", type=Path, default=_harness.INFRA_DIR)
    args = parser.parse_args(argv)
    limit = args.items or (QUICK_ITEMS if args.quick else None)
    source, items = catalog(None if limit is None else limit + WARMUP_ITEMS)
    warmup, items = items[:WARMUP_ITEMS], items[WARMUP_ITEMS:]
    texts = model_texts(items)
    progress(f"{len(items)} items from {source} (+{len(warmup)} for warm-up), {args.threads} torch threads")

    import torch
    torch.set_num_threads(args.threads)
    from services.common.text_encoder import TextEncoder
    encoder = TextEncoder(num_threads=args.threads)
    encoder.encode(model_texts(warmup), batch_size=64)
    bare_before, bare_cpu_before = bare_run(encoder, texts)
    progress(f"bare model: {bare_before:,.1f} items/s")

    with _harness.Suite("embed", infra_dir=args.infra_dir) as suite:
        collector_process = suite.start_collector(name="collector-bench-embed",
                                                  COLLECTOR_MAX_BATCH=str(LOAD_BATCH))
        features_process = suite.start_features(collector_process, name="features-bench-embed",
                                                FEATURES_TORCH_THREADS=str(args.threads))
        collector = collector_pb2_grpc.CollectorServiceStub(grpc.insecure_channel(collector_process.address))
        features = features_pb2_grpc.FeaturesServiceStub(grpc.insecure_channel(features_process.address))

        _harness.upsert_catalog(collector, warmup, LOAD_BATCH)
        _harness.wait_embedded(features, len(warmup), 300)
        baseline = _harness.embeddings_computed(features)
        progress(f"service warmed up ({baseline} items embedded)")

        pids = [collector_process.process.pid, features_process.process.pid]
        cpu_started = [cpu_seconds(pid) for pid in pids]
        started = time.perf_counter()
        loader_error: list[BaseException] = []
        loaded_at: list[float] = []

        def loader() -> None:
            try:
                _harness.upsert_catalog(collector, items, LOAD_BATCH)
                loaded_at.append(time.perf_counter())
            except BaseException as error:  # noqa: BLE001 - reported below
                loader_error.append(error)
        thread = threading.Thread(target=loader, daemon=True)
        thread.start()
        finished = _harness.wait_embedded(features, baseline + len(items),
                                          timeout_s=max(600.0, len(items) / 5))
        thread.join(60)
        if loader_error:
            raise loader_error[0]
        service = len(items) / (finished - started)
        # CPU per item of the two processes the load goes through (Postgres not included): unlike
        # wall time, hardly affected by other work on a shared machine.
        collector_cpu, features_cpu = ((cpu_seconds(pid) - before) / len(items)
                                       for pid, before in zip(pids, cpu_started))
        load_s = loaded_at[0] - started
        progress(f"service: {service:,.1f} items/s (the collector accepted the load in {load_s:.1f}s)")
        status = features.Status(features_pb2.FeaturesServiceStatusRequest(), timeout=30)

    bare_after, bare_cpu_after = bare_run(encoder, texts)
    bare = (bare_before + bare_after) / 2
    bare_cpu = (bare_cpu_before + bare_cpu_after) / 2
    progress(f"bare model again: {bare_after:,.1f} items/s")
    ratio = service / bare
    summary = {
        "benchmark": "embed", "quick": args.quick, "source": source, "items": len(items),
        "torch_threads": args.threads, "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "items_per_s_service": round(service, 1), "items_per_s_bare": round(bare, 1),
        "items_per_s_bare_before": round(bare_before, 1), "items_per_s_bare_after": round(bare_after, 1),
        "ratio": round(ratio, 3), "target_ratio": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO,
        "cpu_ms_per_item_bare": round(bare_cpu * 1000, 2),
        "cpu_ms_per_item_features": round(features_cpu * 1000, 2),
        "cpu_ms_per_item_collector": round(collector_cpu * 1000, 2),
        "cpu_ratio": round(bare_cpu / (features_cpu + collector_cpu), 3),
        "collector_load_s": round(load_s, 2), "embeddings_skipped": status.embeddings_skipped,
        "fallback_embeddings": status.fallback_embeddings, "model": status.model_name,
    }
    _harness.print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
