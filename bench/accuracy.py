"""Accuracy benchmark on Amazon Beauty (leave-one-out, full ranking).

    .venv/bin/python bench/accuracy.py            # full: all users, default epochs
    .venv/bin/python bench/accuracy.py --quick    # ~1-2 min: 2000 users, 6 epochs
    .venv/bin/python bench/accuracy.py --set dim=128 --set dropout=0.3   # tuning

Protocol (leave-one-out, the target ranked against ALL items, history not masked in the headline):

1. selection run: train on each user's sequence minus its last two items, evaluate the validation
   target (second-to-last) every ``--eval-every`` epochs, keep the best epoch by NDCG@10. Every
   hyper-parameter (the ``ModelConfig`` defaults, see its docstring) was chosen on this figure;
2. test model: the same configuration refit on everything before the test target (train + the
   validation item), stopped at the selected epoch, so that the test target is one step past the
   training data as the validation target was (the train-only model's test figures are reported too);
3. cold start: the refit again with 5% of the items (seeded) removed from training entirely; test
   targets that are such items are scored through the text path only, beside popularity on them.

Progress goes to stderr; stdout gets the published table (constants, labelled) with our rows, and
its LAST line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import _harness
from _harness import progress
from scripts.datasets import load_beauty_interactions
from services.model.network import ModelConfig
from services.trainer.evaluation import (
    cold_start_items,
    evaluate_model,
    evaluate_popularity,
    popularity_counts,
    without_items,
)
from services.trainer.interaction_data import InteractionData
from services.trainer.leave_one_out import leave_one_out_split
from services.trainer.training import DEVICE_SETTINGS, resolve_device, train_full

QUICK_USERS = 2000
QUICK_EPOCHS = 6
COLD_START_SHARE = 0.05
# Published on the same data and protocol (leave-one-out, ranked against all items); constants,
# quoted, not measured here. None = not reported by the source.
PUBLISHED_TABLE: tuple[tuple[str, str, float | None, float, float | None, float], ...] = (
    # name, source, Recall@5, Recall@10, NDCG@5, NDCG@10
    ("SASRec", "TIGER's table, Rajput et al., NeurIPS 2023", None, 0.0605, None, 0.0318),
    ("TIGER", "Rajput et al., NeurIPS 2023", 0.0454, 0.0648, 0.0321, 0.0384),
    ("ActionPiece", "Hou et al., ICML 2025", None, 0.0775, None, 0.0424),
    ("SASRec-SS256", "eSASRec paper/repository, Tikhonovich et al., RecSys 2025", None, 0.0921, None, 0.0531),
    ("eSASRec", "same", None, 0.0928, None, 0.0523),
    ("CBiT", "as listed in the eSASRec repository", None, 0.0905, None, 0.0537),
)
METRICS = ("recall_at_5", "recall_at_10", "ndcg_at_5", "ndcg_at_10")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="subset of users and fewer epochs (< ~60 s)")
    parser.add_argument("--data-dir", type=Path, default=_harness.beauty_dir())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override ModelConfig.epochs")
    parser.add_argument("--users", type=int, default=None, help="only the first N users")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    parser.add_argument("--eval-every", type=int, default=2, help="validation (model selection) period")
    parser.add_argument("--patience", type=int, default=None,
                        help="stop the selection run after this many validations without a new best")
    parser.add_argument("--device", default="auto", choices=DEVICE_SETTINGS, help="auto = CUDA when present")
    parser.add_argument("--skip-cold-start", action="store_true",
                        help="skip the cold-start run (a third training)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a ModelConfig field"
    )
    parser.add_argument("--no-test", action="store_true", help="tuning: report validation only")
    return parser.parse_args()


def _config_with_overrides(overrides: list[str]) -> ModelConfig:
    values = ModelConfig().to_dict()
    for override in overrides:
        key, _, raw = override.partition("=")
        if key not in values:
            raise SystemExit(f"unknown ModelConfig field {key!r}")
        current = values[key]
        if isinstance(current, bool):
            values[key] = raw.strip().lower() in ("1", "true", "yes", "on")
        else:
            values[key] = type(current)(raw) if current is not None else json.loads(raw)
    return ModelConfig.from_dict(values)


def _embed_titles(data: InteractionData, titles: list[str]) -> None:
    """Fill ``data.item_text`` (row 0: no item) with the titles' MiniLM vectors."""
    started = time.perf_counter()
    vectors = _harness.title_vectors(data.item_ids.external_ids(), titles)
    data.item_text = np.concatenate([np.zeros((1, vectors.shape[1]), np.float32), vectors])
    progress(f"title vectors ready: {vectors.shape} in {time.perf_counter() - started:.1f}s")


def _ratio(value: float, reference: float) -> float:
    return round(value / reference, 4)


def _rounded(figures: dict[str, float], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{name}": round(value, 5) for name, value in figures.items()}


def _published_best(metric: str) -> tuple[str, float]:
    column = 2 + METRICS.index(metric)
    rows = [(row[0], row[column]) for row in PUBLISHED_TABLE if row[column] is not None]
    return max(rows, key=lambda row: row[1])


def _print_table(rows: list[tuple[str, dict]]) -> None:
    def cell(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "  –   "

    print(f"{'model':<34} {'R@5':>7} {'R@10':>7} {'N@5':>7} {'N@10':>7}")
    for name, source, *values in PUBLISHED_TABLE:
        print(f"{name + ' (published)':<34} " + " ".join(f"{cell(v):>7}" for v in values) + f"   {source}")
    for name, figures in rows:
        print(f"{name:<34} " + " ".join(f"{cell(figures.get(m)):>7}" for m in METRICS))


def main() -> int:
    args = _parse_args()
    torch.set_num_threads(max(1, min(2, args.threads)))
    if not (args.data_dir / "sequences.txt").is_file():
        return _harness.skip(f"Beauty data not found under {args.data_dir}")

    config = _config_with_overrides(args.set)
    if args.epochs is not None or args.quick:
        config = ModelConfig.from_dict({**config.to_dict(), "epochs": args.epochs or QUICK_EPOCHS})
    users = args.users if args.users is not None else (QUICK_USERS if args.quick else None)
    device = resolve_device(args.device)
    mode = "quick" if args.quick else "full"
    progress(f"mode={mode} users={users or 'all'} epochs={config.epochs} seed={args.seed} device={device}")
    progress(f"config: {config.to_json()}")

    data, titles = load_beauty_interactions(args.data_dir, max_users=users)
    _embed_titles(data, titles)
    split = leave_one_out_split(data.histories)
    progress(f"users={len(data.histories)} items={data.num_items} interactions={data.interaction_count()} "
             f"eval cases={len(split.test)}")
    summary: dict = {"benchmark": "accuracy", "mode": mode, "users": len(data.histories),
                     "items": data.num_items, "device": str(device)}

    # 1. selection: train on the train part, pick the epoch by validation NDCG@10 (never test)
    model, stats = train_full(
        data, config, seed=args.seed, histories=split.train, validation=split.validation,
        eval_every=args.eval_every, patience=args.patience, device=device, progress=False,
    )
    progress(f"selection run: {stats.epochs_run} epochs in {stats.train_seconds:.1f}s "
             f"(best validation epoch {stats.best_epoch})")
    for entry in stats.validation_history:
        progress(f"  validation at epoch {entry['epoch']}: " + _brief(entry))
    validation = evaluate_model(model, split.validation, data.item_text)
    validation_popularity = evaluate_popularity(
        split.validation, popularity_counts((c.history for c in split.validation), data.item_ids.table_size)
    )
    summary.update(_rounded(validation, "validation_"))
    summary.update(_rounded(validation_popularity, "popularity_validation_"))
    summary.update({"selection_train_seconds": round(stats.train_seconds, 1), "best_epoch": stats.best_epoch,
                    "selection_epochs_run": stats.epochs_run})
    progress(f"validation: {_brief(validation)}  popularity: {_brief(validation_popularity)}")
    if args.no_test:
        summary["config"] = config.to_dict()
        _harness.print_summary(summary, sort_keys=True)
        return 0

    test_popularity = evaluate_popularity(
        split.test, popularity_counts((c.history for c in split.test), data.item_ids.table_size)
    )
    selection_test = evaluate_model(model, split.test, data.item_text)
    summary.update(_rounded(selection_test, "train_only_model_test_"))
    summary.update(_rounded(test_popularity, "popularity_"))

    # 2. the test model: the selected configuration refit on everything before the test target
    # (train + validation item), stopped at the selected epoch. What the product trains on too.
    refit_histories = {case.user: case.history for case in split.test}
    refit_histories.update({u: h for u, h in split.train.items() if u not in refit_histories})
    best_epoch = stats.best_epoch or config.epochs
    refit, refit_stats = train_full(
        data, config, seed=args.seed, histories=refit_histories, stop_after_epoch=best_epoch, device=device,
        progress=False,
    )
    progress(f"refit on train+validation: {refit_stats.epochs_run} epochs "
             f"in {refit_stats.train_seconds:.1f}s")
    test = evaluate_model(refit, split.test, data.item_text)
    test_masked = evaluate_model(refit, split.test, data.item_text, mask_history=True)
    summary.update(_rounded(test))
    summary.update(_rounded(test_masked, "history_masked_"))
    summary["train_seconds"] = round(refit_stats.train_seconds, 1)
    summary["epochs_run"] = refit_stats.epochs_run

    # 3. cold start: 5% of the items never seen in training, reached through their text only
    if not args.skip_cold_start:
        cold_items = cold_start_items(data.num_items, COLD_START_SHARE, seed=args.seed)
        cold_model, cold_stats = train_full(
            data, config, seed=args.seed, histories=without_items(refit_histories, cold_items),
            stop_after_epoch=best_epoch, device=device, progress=False,
        )
        cold_cases = [case for case in split.test if np.isin(case.target_item, cold_items)]
        cold = evaluate_model(cold_model, cold_cases, data.item_text)
        # popularity as known at prediction time: the cold items' earlier interactions count
        cold_popularity = evaluate_popularity(
            cold_cases, popularity_counts((c.history for c in split.test), data.item_ids.table_size)
        )
        progress(f"cold start ({len(cold_items)} items held out of training, {len(cold_cases)} test targets): "
              f"model {_brief(cold)}  popularity {_brief(cold_popularity)}  "
              f"({cold_stats.train_seconds:.1f}s)")
        summary.update(_rounded(cold, "cold_start_"))
        summary.update(_rounded(cold_popularity, "cold_start_popularity_"))
        summary.update({"cold_start_items": int(len(cold_items)), "cold_start_cases": len(cold_cases)})
        for metric in ("recall_at_10", "ndcg_at_10"):
            summary[f"cold_start_ratio_{metric}_vs_popularity"] = (
                _ratio(cold[metric], cold_popularity[metric]) if cold_popularity[metric] else None)

    print()
    _print_table([
        ("popularity (measured)", test_popularity),
        ("DeltaRec, train-only model", selection_test),
        ("DeltaRec (refit on train+valid)", test),
        ("DeltaRec, history masked", test_masked),
    ])
    print(f"DeltaRec full training: {refit_stats.train_seconds:.0f}s ({refit_stats.epochs_run} epochs, "
          f"{torch.get_num_threads()} threads, {device}); selection run {stats.train_seconds:.0f}s")
    if "cold_start_cases" in summary:
        print(f"cold start, {summary['cold_start_cases']} test targets among {summary['cold_start_items']} items "
              f"held out of training: DeltaRec R@10 {summary['cold_start_recall_at_10']:.4f} "
              f"N@10 {summary['cold_start_ndcg_at_10']:.4f}; popularity R@10 "
              f"{summary['cold_start_popularity_recall_at_10']:.4f} N@10 {summary['cold_start_popularity_ndcg_at_10']:.4f}")
    for metric in METRICS:
        name, best = _published_best(metric)
        summary[f"published_best_{metric}"] = best
        summary[f"published_best_{metric}_model"] = name
        summary[f"ratio_{metric}_vs_best_published"] = _ratio(test[metric], best)
        print(f"{metric}: {test[metric]:.4f} vs best published {best:.4f} ({name}): "
              f"{test[metric] / best:.3f}x")
    summary["published"] = {
        name: dict(zip(METRICS, values)) for name, _source, *values in PUBLISHED_TABLE
    }
    summary.update({
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "history_masked_in_headline": False,
        "config": config.to_dict(),
    })
    _harness.print_summary(summary, sort_keys=True)
    return 0


def _brief(figures: dict) -> str:
    return " ".join(f"{m}={figures[m]:.4f}" for m in METRICS if m in figures)


if __name__ == "__main__":
    sys.exit(main())
