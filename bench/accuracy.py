"""Accuracy benchmark on Amazon Beauty (leave-one-out, full ranking).

    .venv/bin/python bench/accuracy.py            # full: all users, default epochs
    .venv/bin/python bench/accuracy.py --quick    # < ~60 s on an idle machine: 2000 users, 6 epochs
    .venv/bin/python bench/accuracy.py --set dim=128 --set dropout=0.3   # tuning

Trains on the train part, picks the epoch by validation NDCG@10, and reports
validation and test figures. Progress goes to stderr; the LAST stdout line is one
JSON object with all figures, beside the published SASRec and TIGER figures.
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
from services.trainer.evaluation import evaluate_model, evaluate_popularity, popularity_counts
from services.trainer.interaction_data import InteractionData
from services.trainer.leave_one_out import leave_one_out_split
from services.trainer.training import train_full

QUICK_USERS = 2000
QUICK_EPOCHS = 6
PUBLISHED = {
    "sasrec_recall_at_10": 0.0605,
    "sasrec_ndcg_at_10": 0.0318,
    "tiger_recall_at_5": 0.0454,
    "tiger_recall_at_10": 0.0648,
    "tiger_ndcg_at_5": 0.0321,
    "tiger_ndcg_at_10": 0.0384,
}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="subset of users and fewer epochs (< ~60 s)")
    parser.add_argument("--data-dir", type=Path, default=_harness.beauty_dir())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override ModelConfig.epochs")
    parser.add_argument("--users", type=int, default=None, help="only the first N users")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    parser.add_argument("--eval-every", type=int, default=4, help="validation (model selection) period")
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


def main() -> int:
    args = _parse_args()
    torch.set_num_threads(max(1, min(2, args.threads)))
    if not (args.data_dir / "sequences.txt").is_file():
        return _harness.skip(f"Beauty data not found under {args.data_dir}")

    config = _config_with_overrides(args.set)
    users = args.users if args.users is not None else (QUICK_USERS if args.quick else None)
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else config.epochs)
    mode = "quick" if args.quick else "full"
    progress(f"mode={mode} users={users or 'all'} epochs={epochs} seed={args.seed}")
    progress(f"config: {config.to_json()}")

    data, titles = load_beauty_interactions(args.data_dir, max_users=users)
    _embed_titles(data, titles)
    split = leave_one_out_split(data.histories)
    progress(f"users={len(data.histories)} items={data.num_items} interactions={data.interaction_count()} "
             f"eval cases={len(split.test)}")

    model, stats = train_full(
        data, config, seed=args.seed, epochs=epochs, histories=split.train,
        validation=split.validation, eval_every=args.eval_every,
    )
    progress(f"trained {stats.epochs_run} epochs in {stats.train_seconds:.1f}s "
             f"(best validation epoch {stats.best_epoch})")
    item_text = data.item_text
    validation = evaluate_model(model, split.validation, item_text)
    summary: dict = {"benchmark": "accuracy", "mode": mode, "users": len(data.histories), "items": data.num_items}
    summary.update(_rounded(validation, "validation_"))
    validation_popularity = evaluate_popularity(
        split.validation, popularity_counts((c.history for c in split.validation), data.item_ids.table_size)
    )
    summary.update(_rounded(validation_popularity, "popularity_validation_"))
    progress(f"validation: {validation}  popularity: {validation_popularity}")

    if not args.no_test:
        test = evaluate_model(model, split.test, item_text)
        test_masked = evaluate_model(model, split.test, item_text, mask_history=True)
        test_popularity = evaluate_popularity(
            split.test, popularity_counts((c.history for c in split.test), data.item_ids.table_size)
        )
        progress(f"test: {test}  popularity: {test_popularity}")
        progress(f"test with history items masked (not the headline figure): {test_masked}")
        summary.update(_rounded(test))
        summary.update(_rounded(test_masked, "history_masked_"))
        summary.update(_rounded(test_popularity, "popularity_"))
        summary["ratio_recall_at_10_vs_tiger"] = _ratio(test["recall_at_10"], PUBLISHED["tiger_recall_at_10"])
        summary["ratio_ndcg_at_10_vs_tiger"] = _ratio(test["ndcg_at_10"], PUBLISHED["tiger_ndcg_at_10"])
        summary["ratio_recall_at_10_vs_sasrec"] = _ratio(
            test["recall_at_10"], PUBLISHED["sasrec_recall_at_10"]
        )
        summary["ratio_ndcg_at_10_vs_sasrec"] = _ratio(test["ndcg_at_10"], PUBLISHED["sasrec_ndcg_at_10"])
    summary.update(PUBLISHED)
    summary.update(
        {
            "train_seconds": round(stats.train_seconds, 1),
            "epochs_run": stats.epochs_run,
            "best_epoch": stats.best_epoch,
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
            "history_masked_in_headline": False,
            "config": config.to_dict(),
        }
    )
    _harness.print_summary(summary, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
