"""Incremental update vs full retrain, measured on Amazon Beauty.

    .venv/bin/python bench/incremental.py            # all users, 3 steps of 1%
    .venv/bin/python bench/incremental.py --quick    # < ~60 s: 2000 users, 8 epochs, 2 steps
    .venv/bin/python bench/incremental.py --epochs 10 --steps 5 --step-share 0.01

This benchmark calls the trainer's pure run steps (services/trainer/run_steps.py: the same
functions the trainer service runs for Train and Update) directly: no servers, no database, no
etcd. Protocol:

* test target: each user's LAST interaction, never trained on and never fed; Recall@10 and
  NDCG@10 rank it against ALL catalogue items (the Beauty README protocol);
* the rest of each user's sequence: the first 90% is the starting data, the last 10% is the
  delta pool, fed as live traffic (round-robin over users by position, like `make run`'s replay)
  in steps of `--step-share` of all training interactions (default 1%);
* step 0: a full training on the starting data (the published version);
* each step: the step's interactions arrive; (a) INCREMENTAL: warm start from the previous
  incremental version (a chain, as the service runs it), fine-tune on the new interactions plus a
  replay sample (ratio 1) with the id table grown; (b) FULL RETRAIN: from scratch on everything
  fed so far, same config and epochs as step 0. Both are evaluated on the same test cases.
* wall time covers what a run does to produce a model: data preparation (id tables, histories,
  text table), selection, training and the item-vector table; evaluation is excluded from both.
  The process CPU time of the same span is reported too: on a shared machine it is the steadier
  of the two (wall time includes waiting for the CPU).

Targets: an update of a 1% delta in <= 5% of the full-retrain time, accuracy within 1%
(incremental / full >= 0.99 on Recall@10 and NDCG@10). Progress goes to stderr; the per-step
table to stdout; the LAST stdout line is one JSON object with the full-retrain reference measured
in this run, each step and the ratios.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import _harness
from _harness import progress
from scripts.datasets import BEAUTY_SYNTHETIC_START, BEAUTY_SYNTHETIC_STEP_SECONDS, load_beauty_interactions
from services.model.network import ModelConfig
from services.trainer import run_steps, strategies
from services.trainer.evaluation import evaluate_model, evaluate_popularity, popularity_counts
from services.trainer.interaction_log import Interaction
from services.trainer.leave_one_out import EvalCase

QUICK_USERS, QUICK_EPOCHS, QUICK_STEPS = 2000, 8, 2
TARGET_TIME_RATIO, TARGET_ACCURACY_RATIO = 0.05, 0.99


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_USERS} users, {QUICK_EPOCHS} epochs, "
                                                             f"{QUICK_STEPS} steps (< ~60 s)")
    parser.add_argument("--data-dir", type=Path, default=_harness.beauty_dir())
    parser.add_argument("--users", type=int, default=None, help="only the first N users")
    parser.add_argument("--epochs", type=int, default=None, help="full-training epochs (default: ModelConfig)")
    parser.add_argument("--steps", type=int, default=None, help="delta steps (default 3; quick 2)")
    parser.add_argument("--step-share", type=float, default=0.01, help="interactions per step / all training ones")
    parser.add_argument("--replay-ratio", type=float, default=1.0)
    parser.add_argument("--priority", default="", choices=("", *strategies.PRIORITIES))
    parser.add_argument("--top-share", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def text_vectors(data, titles: list[str]) -> dict[str, np.ndarray]:
    """External item id -> its title's MiniLM vector."""
    ids = data.item_ids.external_ids()
    return dict(zip(ids, _harness.title_vectors(ids, titles)))


def split(data) -> tuple[list[Interaction], list[Interaction], dict[str, tuple[str, float]]]:
    """(starting interactions, delta pool in arrival order, user -> (test item, its time))."""
    base, pool, tests = [], [], {}
    row = 0
    for user_index in sorted(data.histories):
        user = data.user_ids.external(user_index)
        items = [data.item_ids.external(int(i)) for i in data.histories[user_index].items]
        if len(items) < 2:
            continue
        tests[user] = (items[-1], BEAUTY_SYNTHETIC_START + BEAUTY_SYNTHETIC_STEP_SECONDS * (len(items) - 1))
        rest = items[:-1]
        cut = max(1, math.floor(0.9 * len(rest)))
        for position, item in enumerate(rest):
            row += 1
            interaction = Interaction(f"{user}:{position}", user, item, "purchase",
                                      BEAUTY_SYNTHETIC_START + BEAUTY_SYNTHETIC_STEP_SECONDS * position, 0, row)
            (base if position < cut else pool).append(interaction)
    pool.sort(key=lambda i: (i.occurred_at, i.row_id))   # live-traffic order: round-robin by position
    return base, pool, tests


def cases_for(prepared: run_steps.Prepared, tests: dict[str, tuple[str, float]]) -> list[EvalCase]:
    cases = []
    for user, (item, when) in sorted(tests.items()):
        index = prepared.data.user_ids.get(user)
        if index:
            cases.append(EvalCase(index, prepared.data.histories[index], prepared.data.item_ids.get(item), when))
    return cases


def metrics(model, prepared, tests) -> dict:
    figures = evaluate_model(model, cases_for(prepared, tests), prepared.data.item_text)
    return {"recall_at_10": round(figures["recall_at_10"], 5), "ndcg_at_10": round(figures["ndcg_at_10"], 5)}


class Clock:
    """Wall and process-CPU seconds of a span."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def full_run(interactions, catalog, vectors, config, seed, epochs):
    clock = Clock()
    prepared = run_steps.prepare(interactions, catalog_items=catalog, eval_users=0)
    run_steps.set_item_text(prepared, vectors)
    model, stats = run_steps.run_full(prepared, config, seed=seed, epochs=epochs)
    run_steps.item_vector_table(model, prepared, catalog)
    return model, prepared, clock.stop()


def incremental_run(parent, parent_ids, interactions, catalog, vectors, after_lsn, strategy, seed):
    clock = Clock()
    prepared = run_steps.prepare(interactions, item_prefix=parent_ids, catalog_items=catalog, eval_users=0)
    run_steps.set_item_text(prepared, vectors)
    new, old_counts = run_steps.new_interactions(prepared, after_lsn)
    selection = strategies.select(new, strategy, max(i.occurred_at for i in interactions), old_counts)
    model = run_steps.remap_items(parent, parent_ids, prepared.data.item_ids)
    stats = run_steps.run_incremental(model, prepared, run_steps.examples_of(selection.selected),
                                     strategy.replay_ratio, seed=seed)
    run_steps.item_vector_table(model, prepared, catalog)
    return model, prepared, clock.stop(), selection, stats


def main() -> int:
    args = parse_args()
    torch.set_num_threads(max(1, min(2, args.threads)))
    if not (args.data_dir / "sequences.txt").is_file():
        return _harness.skip(f"Beauty data not found under {args.data_dir}")
    users = args.users if args.users is not None else (QUICK_USERS if args.quick else None)
    config = ModelConfig()
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else config.epochs)
    steps_wanted = args.steps or (QUICK_STEPS if args.quick else 3)
    strategy = strategies.Strategy(priority=args.priority, top_share=args.top_share,
                                   replay_ratio=args.replay_ratio).validate()

    data, titles = load_beauty_interactions(args.data_dir, max_users=users)
    vectors = text_vectors(data, titles)
    catalog = data.item_ids.external_ids()
    base, pool, tests = split(data)
    trainable = len(base) + len(pool)
    chunk = max(1, math.ceil(args.step_share * trainable))
    steps = min(steps_wanted, len(pool) // chunk)
    progress(f"users={len(tests)} items={len(catalog)} training interactions={trainable} "
             f"(start {len(base)}, delta pool {len(pool)}); {steps} steps of {chunk} ({args.step_share:.1%}); "
             f"full epochs={epochs}, incremental epochs={config.incremental_epochs}, replay {args.replay_ratio}, "
             f"strategy {strategy.name}")

    fed = [Interaction(i.event_id, i.user_id, i.item_id, i.event_type, i.occurred_at, 1, i.row_id) for i in base]
    progress(f"step 0: full training on the starting data ({len(fed)} interactions)")
    model, prepared, (seconds0, _) = full_run(fed, catalog, vectors, config, args.seed, epochs)
    start_metrics = metrics(model, prepared, tests)
    progress(f"step 0: {seconds0:.1f}s {start_metrics}")
    incremental_model, incremental_ids = model, prepared.data.item_ids.external_ids()

    rows = []
    print(f"{'step':>4} {'delta':>6} {'incr s':>8} {'full s':>8} {'time':>7} "
          f"{'R@10 incr':>10} {'R@10 full':>10} {'ratio':>6} {'N@10 incr':>10} {'N@10 full':>10} {'ratio':>6}")
    for step in range(1, steps + 1):
        lsn = step + 1
        chunk_rows = pool[(step - 1) * chunk: step * chunk]
        fed = fed + [Interaction(i.event_id, i.user_id, i.item_id, i.event_type, i.occurred_at, lsn, i.row_id)
                     for i in chunk_rows]
        progress(f"step {step}: incremental update on {len(chunk_rows)} new interactions")
        incremental_model, prepared_i, (seconds_i, cpu_i), selection, stats = incremental_run(
            incremental_model, incremental_ids, fed, catalog, vectors, lsn - 1, strategy, args.seed)
        incremental_ids = prepared_i.data.item_ids.external_ids()
        figures_i = metrics(incremental_model, prepared_i, tests)
        progress(f"step {step}: incremental {seconds_i:.2f}s {figures_i}; full retrain on {len(fed)} interactions")
        full_model, prepared_f, (seconds_f, cpu_f) = full_run(fed, catalog, vectors, config, args.seed, epochs)
        figures_f = metrics(full_model, prepared_f, tests)
        progress(f"step {step}: full {seconds_f:.1f}s {figures_f}")
        row = {
            "step": step, "delta_interactions": len(chunk_rows), "delta_share": round(len(chunk_rows) / trainable, 5),
            "selected": len(selection.selected), "replay_examples": stats.replay_examples,
            "incremental_seconds": round(seconds_i, 3), "full_seconds": round(seconds_f, 3),
            "time_ratio": round(seconds_i / seconds_f, 5),
            "incremental_cpu_seconds": round(cpu_i, 3), "full_cpu_seconds": round(cpu_f, 3),
            "cpu_time_ratio": round(cpu_i / cpu_f, 5) if cpu_f else None,
            "incremental": figures_i, "full": figures_f,
            "recall_at_10_ratio": round(figures_i["recall_at_10"] / figures_f["recall_at_10"], 4)
            if figures_f["recall_at_10"] else None,
            "ndcg_at_10_ratio": round(figures_i["ndcg_at_10"] / figures_f["ndcg_at_10"], 4)
            if figures_f["ndcg_at_10"] else None,
        }
        rows.append(row)
        print(f"{step:>4} {len(chunk_rows):>6} {seconds_i:>8.2f} {seconds_f:>8.1f} {row['time_ratio']:>7.2%} "
              f"{figures_i['recall_at_10']:>10.4f} {figures_f['recall_at_10']:>10.4f} {row['recall_at_10_ratio']!s:>6} "
              f"{figures_i['ndcg_at_10']:>10.4f} {figures_f['ndcg_at_10']:>10.4f} {row['ndcg_at_10_ratio']!s:>6}",
              flush=True)

    popularity = evaluate_popularity(cases_for(prepared_f, tests), popularity_counts(
        prepared_f.data.histories.values(), prepared_f.data.item_ids.table_size)) if rows else {}
    time_ratio = max((r["time_ratio"] for r in rows), default=None)
    recall_ratio = min((r["recall_at_10_ratio"] or 0 for r in rows), default=None)
    ndcg_ratio = min((r["ndcg_at_10_ratio"] or 0 for r in rows), default=None)
    summary = {
        "benchmark": "incremental", "mode": "quick" if args.quick else "full", "pure_pipeline": True,
        "users": len(tests), "items": len(catalog), "training_interactions": trainable,
        "start_interactions": len(base), "delta_pool": len(pool), "steps": len(rows), "step_share": args.step_share,
        "full_epochs": epochs, "incremental_epochs": config.incremental_epochs, "strategy": strategy.to_dict(),
        "seed": args.seed, "torch_threads": torch.get_num_threads(),
        "step0": {"full_seconds": round(seconds0, 2), **start_metrics},
        "reference": {
            "what": "full retrain from scratch at each step, same config and epochs, measured in this run",
            "full_retrain_seconds_mean": round(float(np.mean([r["full_seconds"] for r in rows])), 2) if rows else None,
            "recall_at_10": rows[-1]["full"]["recall_at_10"] if rows else None,
            "ndcg_at_10": rows[-1]["full"]["ndcg_at_10"] if rows else None,
            "popularity_recall_at_10": round(popularity.get("recall_at_10", 0.0), 5),
            "popularity_ndcg_at_10": round(popularity.get("ndcg_at_10", 0.0), 5),
        },
        "incremental": {
            "update_seconds_mean": round(float(np.mean([r["incremental_seconds"] for r in rows])), 3) if rows else None,
            "recall_at_10": rows[-1]["incremental"]["recall_at_10"] if rows else None,
            "ndcg_at_10": rows[-1]["incremental"]["ndcg_at_10"] if rows else None,
        },
        "per_step": rows,
        "time_ratio_max": time_ratio, "recall_at_10_ratio_min": recall_ratio, "ndcg_at_10_ratio_min": ndcg_ratio,
        "cpu_time_ratio_max": max((r["cpu_time_ratio"] or 0 for r in rows), default=None),
        "target": {"time_ratio_max": TARGET_TIME_RATIO, "accuracy_ratio_min": TARGET_ACCURACY_RATIO},
        "meets_time_target": time_ratio is not None and time_ratio <= TARGET_TIME_RATIO,
        "meets_accuracy_target": recall_ratio is not None and min(recall_ratio, ndcg_ratio) >= TARGET_ACCURACY_RATIO,
    }
    _harness.print_summary(summary, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
