"""Accuracy benchmark on Amazon Beauty (leave-one-out, full ranking).

    .venv/bin/python bench/accuracy.py            # full: all users, default epochs
    .venv/bin/python bench/accuracy.py --quick    # ~1-2 min: 2000 users, 6 epochs
    .venv/bin/python bench/accuracy.py --set dim=128 --set dropout=0.3   # tuning
    .venv/bin/python bench/accuracy.py --no-test --users 11000 --epochs 8  # cheap selection-only comparison

Protocol (leave-one-out, the target ranked against ALL items):

1. selection run: train on each user's sequence minus its last two items, evaluate the validation
   target (second-to-last) every ``--eval-every`` epochs, keep the best epoch by NDCG@10. Every
   hyper-parameter (the ``ModelConfig`` defaults, see its docstring) was chosen on this figure;
2. test model: the same configuration refit on everything before the test target (train + the
   validation item), stopped at the selected epoch, so that the test target is one step past the
   training data as the validation target was (the train-only model's test figures are reported too);
3. cold start: the train part with 5% of the items (seeded) removed entirely, stopped at the
   selected epoch. Those items reach the model through their text only (id row 0) and, served,
   through the reserved new-item slots (services/model/new_items.py): the last
   ``--new-item-slots`` of the top 10 go to items without a learned id that have traction (a
   popularity from the interactions visible at prediction time: what the features service counts
   and the model never trained on), ordered among themselves by model score + weight * log(1 +
   popularity / scale). The order's (weight, scale) is chosen on the validation held-out targets;
   then the test targets that are held-out items are scored as served, by the plain ranking
   without slots (their text path alone), and by popularity counted at prediction time, and all
   test targets with and without the slots (what the slots cost the others). The cold model is
   trained on the train part, not refit on train + validation: choosing on validation needs a
   model that did not train on the validation items, and a fourth training does not fit the
   machine; so its test targets are two steps past its training data (a handicap, like the
   train-only model's).

With ``--jobs`` > 1 (default 3) the three trainings run at once, one process each: the refits run
the whole schedule and keep a snapshot at every epoch the selection run evaluates, then the
snapshot at the selected epoch is used - the same weights as stopping there (the learning-rate
schedule and the random stream do not depend on where a run stops). The wall time is then about
one training instead of three.

Test figures are reported both ways: with the items the user already interacted with left in the
ranking ("unmasked") and with them filtered out ("history masked", what the ranker serves). Each
published row is compared with our figure under the protocol its own evaluation code uses
(``PUBLISHED_TABLE``; the evidence is quoted in the README); rows whose protocol is not known are
compared with the unmasked figure, the lower one.

Progress goes to stderr; stdout gets the published table (constants, labelled) with our rows, and
its LAST line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import sys
import time
import atexit
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

import _harness
from _harness import progress
from scripts.datasets import load_beauty_interactions
from services.contracts.event_types import NUM_EVENT_TYPES, EventType
from services.features.item_stats import EVENT_WEIGHTS
from services.model.network import DeltaRecModel, ModelConfig, id_less_popularity_prior
from services.model.new_items import DEFAULT_NEW_ITEM_SLOTS, new_item_candidates
from services.trainer.evaluation import (
    cold_start_items,
    evaluate_model,
    evaluate_popularity,
    metrics_from_ranks,
    popularity_counts,
    rank_targets_with_biases,
    ranks_with_new_item_slots,
    without_items,
)
from services.trainer.interaction_data import InteractionData
from services.trainer.leave_one_out import leave_one_out_split
from services.trainer.training import DEVICE_SETTINGS, resolve_device, train_full

QUICK_USERS = 2000
QUICK_EPOCHS = 6
COLD_START_SHARE = 0.05
# The new-item slots' order (ModelConfig.new_item_popularity_weight / _scale) compared on the
# validation held-out targets (every pair; weight 0 = the text score alone). 2026-12-02, d=128
# refit to epoch 12, 1 slot: (2, 30) best, held-out NDCG@10 0.0186 (text alone 0.0145).
PRIOR_WEIGHTS = (0.0, 0.35, 1.0, 2.0, 4.0)
PRIOR_SCALES = (1.0, 30.0, 300.0)
UNMASKED, MASKED, NOT_STATED = "unmasked", "history masked", "not stated"
# Published on the same data and protocol (leave-one-out, ranked against all items); constants,
# quoted, not measured here. None = not reported by the source. The protocol column says whether
# the source's evaluation filters the user's already-seen items out of the ranking (README
# "Accuracy" quotes the code): RecTools' recommend(filter_viewed=True) for the eSASRec benchmark,
# CBiT's candidate list without the interacted items; ActionPiece's evaluator matches the beam
# search output against the target without filtering; TIGER has no public code.
PUBLISHED_TABLE: tuple[tuple[str, str, str, float | None, float, float | None, float], ...] = (
    # name, source, protocol, Recall@5, Recall@10, NDCG@5, NDCG@10
    ("SASRec", "TIGER's table, Rajput et al., NeurIPS 2023", NOT_STATED, None, 0.0605, None, 0.0318),
    ("TIGER", "Rajput et al., NeurIPS 2023", NOT_STATED, 0.0454, 0.0648, 0.0321, 0.0384),
    ("ActionPiece", "Hou et al., ICML 2025", UNMASKED, None, 0.0775, None, 0.0424),
    ("SASRec-SS256", "eSASRec paper/repository, Tikhonovich et al., RecSys 2025", MASKED,
     None, 0.0921, None, 0.0531),
    ("eSASRec", "same", MASKED, None, 0.0928, None, 0.0523),
    ("CBiT", "as listed in the eSASRec repository", MASKED, None, 0.0905, None, 0.0537),
)
METRICS = ("recall_at_5", "recall_at_10", "ndcg_at_5", "ndcg_at_10")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="subset of users and fewer epochs (< ~60 s)")
    parser.add_argument("--data-dir", type=Path, default=_harness.beauty_dir())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override ModelConfig.epochs")
    parser.add_argument("--users", type=int, default=None, help="only the first N users")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per training (default: 2 alone, 1 with --jobs > 1; the machine has 2 cores)")
    parser.add_argument("--eval-every", type=int, default=2, help="validation (model selection) period")
    parser.add_argument("--patience", type=int, default=None,
                        help="stop the selection run after this many validations without a new best")
    parser.add_argument("--device", default="auto", choices=DEVICE_SETTINGS, help="auto = CUDA when present")
    parser.add_argument("--prior-weights", type=float, nargs="+", default=list(PRIOR_WEIGHTS),
                        help="cold start: weights of the new-item slots' popularity term compared on validation")
    parser.add_argument("--prior-scales", type=float, nargs="+", default=list(PRIOR_SCALES),
                        help="cold start: scales of that term compared on validation")
    parser.add_argument("--new-item-slots", type=int, default=DEFAULT_NEW_ITEM_SLOTS,
                        help="cold start: places of the top 10 reserved for new items with traction "
                             "(the ranker's RANKER_NEW_ITEM_SLOTS; 0 = the plain ranking)")
    parser.add_argument("--cold-start-only", type=int, default=None, metavar="EPOCH",
                        help="only the cold-start training, stopped at EPOCH (a full run's selected epoch), "
                             "and its figures")
    parser.add_argument("--skip-cold-start", action="store_true",
                        help="skip the cold-start run (a third training)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a ModelConfig field"
    )
    parser.add_argument("--no-test", action="store_true", help="tuning: report validation only")
    parser.add_argument("--jobs", type=int, default=3,
                        help="trainings run at once (selection, refit, cold start), one process each; 1 = in turn")
    parser.add_argument("--verbose", action="store_true", help="per-epoch loss and validation on stderr")
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


def _ours_for(protocol: str, figures_by_protocol: dict[str, dict]) -> dict:
    """Our figures under a published row's protocol; rows of unknown protocol get the unmasked
    (lower) figures, never the masked ones."""
    return figures_by_protocol[MASKED if protocol == MASKED else UNMASKED]


def _comparison(figures_by_protocol: dict[str, dict]) -> dict:
    """Per metric: the best published row, our figure under its protocol and the ratio, and the
    worst ratio over all rows (> 1 = every row beaten, each under its own protocol)."""
    out: dict = {}
    for metric in METRICS:
        column = 3 + METRICS.index(metric)
        rows = [(row[0], row[2], row[column]) for row in PUBLISHED_TABLE if row[column] is not None]
        name, protocol, best = max(rows, key=lambda row: row[2])
        ours = _ours_for(protocol, figures_by_protocol)[metric]
        worst = min(rows, key=lambda row: _ours_for(row[1], figures_by_protocol)[metric] / row[2])
        out.update({
            f"published_best_{metric}": best, f"published_best_{metric}_model": name,
            f"published_best_{metric}_protocol": protocol, f"ours_{metric}_on_that_protocol": round(ours, 5),
            f"ratio_{metric}_vs_best_published": _ratio(ours, best),
            f"ratio_{metric}_vs_every_row_min": _ratio(_ours_for(worst[1], figures_by_protocol)[metric], worst[2]),
            f"ratio_{metric}_vs_every_row_min_model": worst[0],
        })
    return out


def _print_table(rows: list[tuple[str, dict]]) -> None:
    def cell(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "  –   "

    print(f"{'model':<34} {'R@5':>7} {'R@10':>7} {'N@5':>7} {'N@10':>7}   protocol, source")
    for name, source, protocol, *values in PUBLISHED_TABLE:
        print(f"{name + ' (published)':<34} " + " ".join(f"{cell(v):>7}" for v in values)
              + f"   {protocol}; {source}")
    for name, figures in rows:
        print(f"{name:<34} " + " ".join(f"{cell(figures.get(m)):>7}" for m in METRICS))


def _prepare(data_dir: Path, users: int | None):
    """Beauty with MiniLM title vectors and its leave-one-out split."""
    data, titles = load_beauty_interactions(data_dir, max_users=users)
    _embed_titles(data, titles)
    return data, leave_one_out_split(data.histories)


def _refit_histories(split) -> dict:
    """Everything before each test target: the train part plus the validation item."""
    histories = {case.user: case.history for case in split.test}
    histories.update({u: h for u, h in split.train.items() if u not in histories})
    return histories


def _log_epoch(kind: str, done: int, total: int) -> None:
    """train_full reports (done, total) as each epoch starts and ends: log the ends only once."""
    if done and _logged_epochs.setdefault(kind, 0) < done:
        _logged_epochs[kind] = done
        progress(f"{kind}: epoch {done}/{total} done")


_logged_epochs: dict[str, int] = {}


def _terminate_workers(pool: ProcessPoolExecutor) -> None:
    """Kill the executor's worker processes (shutdown() alone lets running trainings finish)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # None after shutdown()
        if process.is_alive():
            process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def _train(kind: str, config_json: str, options: dict, prepared=None, snapshot_epochs=(),
           stop_after_epoch: int | None = None):
    """One of the benchmark's trainings (``selection``, ``refit``, ``cold_start``), in this process
    or in a worker (then ``prepared`` is None and the data are loaded from the cache here)."""
    torch.set_num_threads(options["threads"])
    config = ModelConfig.from_json(config_json)
    data, split = prepared if prepared is not None else _prepare(Path(options["data_dir"]), options["users"])
    common = dict(seed=options["seed"], device=options["device"], progress=options["verbose"],
                  on_epoch=functools.partial(_log_epoch, kind))
    if kind == "selection":
        histories = split.train
        common.update(validation=split.validation, eval_every=options["eval_every"], patience=options["patience"])
    elif kind == "refit":
        histories = _refit_histories(split)
    elif kind == "cold_start":
        cold_items = cold_start_items(data.num_items, COLD_START_SHARE, seed=options["seed"])
        histories = without_items(split.train, cold_items)
    else:
        raise ValueError(kind)
    model, stats = train_full(data, config, histories=histories, snapshot_epochs=snapshot_epochs,
                              stop_after_epoch=stop_after_epoch, **common)
    return model, stats


def _model_at(config: ModelConfig, num_items: int, state: dict) -> DeltaRecModel:
    model = DeltaRecModel(config, num_items=num_items)
    model.load_state_dict(state)
    return model.eval()


def _evaluation_epochs(epochs: int, eval_every: int) -> list[int]:
    """The epochs at which train_full's selection evaluates (and so may stop and pick)."""
    return sorted({e for e in range(1, epochs + 1) if e % eval_every == 0} | {epochs})


def main() -> int:
    args = _parse_args()
    torch.set_num_threads(max(1, min(2, args.threads or 2)))
    if not (args.data_dir / "sequences.txt").is_file():
        return _harness.skip(f"Beauty data not found under {args.data_dir}")

    config = _config_with_overrides(args.set)
    if args.epochs is not None or args.quick:
        config = ModelConfig.from_dict({**config.to_dict(), "epochs": args.epochs or QUICK_EPOCHS})
    users = args.users if args.users is not None else (QUICK_USERS if args.quick else None)
    device = resolve_device(args.device)
    mode = "quick" if args.quick else "full"
    jobs = 1 if args.no_test else max(1, min(3, args.jobs))
    threads = max(1, min(2, args.threads or (1 if jobs > 1 else 2)))
    progress(f"mode={mode} users={users or 'all'} epochs={config.epochs} seed={args.seed} device={device} "
             f"jobs={jobs}")
    progress(f"config: {config.to_json()}")

    # loaded (and the title vectors cached) before any worker starts, so workers only read the cache
    prepared = _prepare(args.data_dir, users)
    data, split = prepared
    if args.cold_start_only is not None:
        jobs = 1
        options_only = {"data_dir": str(args.data_dir), "users": users, "seed": args.seed, "device": str(device),
                        "verbose": args.verbose, "eval_every": args.eval_every, "patience": args.patience,
                        "threads": max(1, min(2, args.threads or 2))}
        return _cold_start_only(args, config, prepared, options_only,
                                {"benchmark": "accuracy", "mode": mode, "users": len(data.histories),
                                 "items": data.num_items, "device": str(device), "jobs": 1})
    progress(f"users={len(data.histories)} items={data.num_items} interactions={data.interaction_count()} "
             f"eval cases={len(split.test)}")
    summary: dict = {"benchmark": "accuracy", "mode": mode, "users": len(data.histories),
                     "items": data.num_items, "device": str(device), "jobs": jobs}
    options = {"data_dir": str(args.data_dir), "users": users, "seed": args.seed, "device": str(device),
               "verbose": args.verbose, "eval_every": args.eval_every, "patience": args.patience,
               "threads": threads}
    snapshot_epochs = _evaluation_epochs(config.epochs, args.eval_every)

    started = time.perf_counter()
    pool = None
    if jobs > 1:
        # spawn, not fork: the parent has run MiniLM/torch thread pools, which do not survive a fork
        # (not multiprocessing.Pool: it waits forever when a worker dies; the executor raises)
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
        # a benchmark stops what it started: the workers go with the parent (end, error or SIGTERM)
        atexit.register(_terminate_workers, pool)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        refit_future = pool.submit(_train, "refit", config.to_json(), options, None, snapshot_epochs)
        cold_future = (None if args.skip_cold_start else
                       pool.submit(_train, "cold_start", config.to_json(), options, None, snapshot_epochs))
        selection_future = pool.submit(_train, "selection", config.to_json(), options)

    # 1. selection: train on the train part, pick the epoch by validation NDCG@10 (never test)
    if pool is not None:
        model, stats = selection_future.result()
    else:
        model, stats = _train("selection", config.to_json(), options, prepared)
    progress(f"selection run: {stats.epochs_run} epochs in {stats.train_seconds:.1f}s "
             f"(best validation epoch {stats.best_epoch})")
    for entry in stats.validation_history:
        progress(f"  validation at epoch {entry['epoch']}: " + _brief(entry)
                 + "  history masked: " + _brief({m: entry[f"history_masked_{m}"] for m in METRICS}))
    validation = evaluate_model(model, split.validation, data.item_text)
    validation_masked = evaluate_model(model, split.validation, data.item_text, mask_history=True)
    validation_popularity = evaluate_popularity(
        split.validation, popularity_counts((c.history for c in split.validation), data.item_ids.table_size)
    )
    summary.update(_rounded(validation, "validation_"))
    summary.update(_rounded(validation_masked, "validation_history_masked_"))
    summary.update(_rounded(validation_popularity, "popularity_validation_"))
    summary.update({"selection_train_seconds": round(stats.train_seconds, 1), "best_epoch": stats.best_epoch,
                    "selection_epochs_run": stats.epochs_run,
                    "validation_history": [{k: round(v, 5) if isinstance(v, float) else v for k, v in e.items()}
                                           for e in stats.validation_history]})
    progress(f"validation: {_brief(validation)}  history masked: {_brief(validation_masked)}  "
             f"popularity: {_brief(validation_popularity)}")
    if args.no_test:
        summary["config"] = config.to_dict()
        _harness.print_summary(summary, sort_keys=True)
        return 0

    test_popularity = evaluate_popularity(
        split.test, popularity_counts((c.history for c in split.test), data.item_ids.table_size)
    )
    test_popularity_masked = evaluate_popularity(
        split.test, popularity_counts((c.history for c in split.test), data.item_ids.table_size), mask_history=True
    )
    selection_test = evaluate_model(model, split.test, data.item_text)
    summary.update(_rounded(selection_test, "train_only_model_test_"))
    summary.update(_rounded(test_popularity, "popularity_"))
    summary.update(_rounded(test_popularity_masked, "popularity_history_masked_"))

    # 2. the test model: the selected configuration refit on everything before the test target
    # (train + validation item), stopped at the selected epoch. What the product trains on too.
    best_epoch = stats.best_epoch or config.epochs
    if pool is not None:
        _, refit_stats = refit_future.result()
        refit = _model_at(config, data.num_items, refit_stats.snapshots[best_epoch])
    else:
        refit, refit_stats = _train("refit", config.to_json(), options, prepared, stop_after_epoch=best_epoch)
    progress(f"refit on train+validation: {refit_stats.epochs_run} epochs in {refit_stats.train_seconds:.1f}s"
             + (f" (snapshot at epoch {best_epoch} used)" if pool is not None else ""))
    test = evaluate_model(refit, split.test, data.item_text)
    test_masked = evaluate_model(refit, split.test, data.item_text, mask_history=True)
    summary.update(_rounded(test))
    summary.update(_rounded(test_masked, "history_masked_"))
    # the trainer's full training = the refit stopped at the chosen epoch; with concurrent jobs the
    # refit ran the whole schedule, so its time is scaled to the chosen epoch's share of it
    refit_seconds = refit_stats.train_seconds * (best_epoch / refit_stats.epochs_run if pool is not None else 1.0)
    summary["train_seconds"] = round(refit_seconds, 1)
    summary["refit_run_seconds"] = round(refit_stats.train_seconds, 1)
    summary["epochs_run"] = best_epoch

    # 3. cold start: 5% of the items never seen in training, reached through their text only
    if not args.skip_cold_start:
        cold_items = cold_start_items(data.num_items, COLD_START_SHARE, seed=args.seed)
        if pool is not None:
            _, cold_stats = cold_future.result()
            cold_model = _model_at(config, data.num_items, cold_stats.snapshots[best_epoch])
        else:
            cold_model, cold_stats = _train("cold_start", config.to_json(), options, prepared,
                                            stop_after_epoch=best_epoch)
        summary.update(_cold_start(cold_model, cold_stats, cold_items, data, split, args.prior_weights,
                                   args.prior_scales, args.new_item_slots))
    if pool is not None:
        pool.shutdown()
    summary["trainings_wall_seconds"] = round(time.perf_counter() - started, 1)

    print()
    _print_table([
        ("popularity (measured)", test_popularity),
        ("popularity, history masked", test_popularity_masked),
        ("DeltaRec, train-only model", selection_test),
        ("DeltaRec (refit on train+valid)", test),
        ("DeltaRec, history masked", test_masked),
    ])
    print(f"DeltaRec full training: {refit_seconds:.0f}s ({best_epoch} epochs, "
          f"{options['threads']} thread(s) per training, {jobs} training(s) at once, {device}); "
          f"selection run {stats.train_seconds:.0f}s")
    if "cold_start_cases" in summary:
        print(_cold_start_line(summary))
    comparison = _comparison({UNMASKED: test, MASKED: test_masked})
    summary.update(comparison)
    for metric in METRICS:
        print(f"{metric}: {comparison[f'ours_{metric}_on_that_protocol']:.4f} "
              f"({comparison[f'published_best_{metric}_protocol']}) vs best published "
              f"{comparison[f'published_best_{metric}']:.4f} ({comparison[f'published_best_{metric}_model']}): "
              f"{comparison[f'ratio_{metric}_vs_best_published']:.3f}x; worst ratio over the rows, each on "
              f"its protocol: {comparison[f'ratio_{metric}_vs_every_row_min']:.3f}x "
              f"({comparison[f'ratio_{metric}_vs_every_row_min_model']})")
    summary["published"] = {
        name: {"protocol": protocol, **dict(zip(METRICS, values))}
        for name, _source, protocol, *values in PUBLISHED_TABLE
    }
    summary.update({
        "seed": args.seed,
        "torch_threads_per_training": options["threads"],
        "config": config.to_dict(),
    })
    _harness.print_summary(summary, sort_keys=True)
    return 0


def _cold_start(cold_model: DeltaRecModel, cold_stats, cold_items: np.ndarray, data: InteractionData, split,
                weights, scales, slots: int) -> dict:
    """Step 3 on a trained cold-start model: the new-item slots' order chosen on validation, then
    the test figures (see the module docstring)."""
    cold_histories = without_items(split.train, cold_items)
    weight, scale, sweep = choose_new_item_order(cold_model, split.validation, cold_items, cold_histories,
                                                 data, weights, scales, slots)
    for entry in sweep:
        progress(f"  new-item order weight {entry['weight']} scale {entry['scale']} ({slots} slot(s)): validation "
                 f"all targets R@10 {entry['all_recall_at_10']:.4f} N@10 {entry['all_ndcg_at_10']:.4f}; held-out "
                 f"targets R@10 {entry['held_out_recall_at_10']:.4f} N@10 {entry['held_out_ndcg_at_10']:.4f}")
    validation = cold_start_figures(cold_model, split.validation, cold_items, cold_histories, data, weight, scale,
                                    slots, prefix="cold_start_validation_")
    figures = cold_start_figures(cold_model, split.test, cold_items, cold_histories, data, weight, scale, slots)
    progress(f"cold start ({len(cold_items)} items held out of training, {figures['cold_start_cases']} test "
             f"targets): served {_brief(_pick(figures, 'cold_start_'))}  without slots "
             f"{_brief(_pick(figures, 'cold_start_text_only_'))}  popularity "
             f"{_brief(_pick(figures, 'cold_start_popularity_'))}  ({cold_stats.train_seconds:.1f}s)")
    return {**figures, **validation, "cold_start_new_item_order_validation": sweep,
            "cold_start_items": int(len(cold_items)), "cold_start_train_seconds": round(cold_stats.train_seconds, 1)}


def _cold_start_line(summary: dict) -> str:
    return (f"cold start, {summary['cold_start_cases']} test targets among {summary['cold_start_items']} items "
            f"held out of training: DeltaRec R@10 {summary['cold_start_recall_at_10']:.4f} "
            f"N@10 {summary['cold_start_ndcg_at_10']:.4f} ({summary['cold_start_new_item_slots']} new-item slot(s), "
            f"order weight {summary['cold_start_new_item_popularity_weight']} scale "
            f"{summary['cold_start_new_item_popularity_scale']}); popularity R@10 "
            f"{summary['cold_start_popularity_recall_at_10']:.4f} N@10 {summary['cold_start_popularity_ndcg_at_10']:.4f}; "
            f"without slots R@10 {summary['cold_start_text_only_recall_at_10']:.4f} "
            f"N@10 {summary['cold_start_text_only_ndcg_at_10']:.4f}. All test targets: R@10 "
            f"{summary['cold_start_all_targets_recall_at_10']:.4f} with slots vs "
            f"{summary['cold_start_all_targets_text_only_recall_at_10']:.4f} without, N@10 "
            f"{summary['cold_start_all_targets_ndcg_at_10']:.4f} vs {summary['cold_start_all_targets_text_only_ndcg_at_10']:.4f}")


def _cold_start_only(args, config: ModelConfig, prepared, options: dict, summary: dict) -> int:
    """``--cold-start-only EPOCH``: only the cold-start training (stopped at EPOCH, the epoch a full
    run's selection picked) and step 3; the warm figures are not measured."""
    data, split = prepared
    cold_items = cold_start_items(data.num_items, COLD_START_SHARE, seed=args.seed)
    started = time.perf_counter()
    cold_model, cold_stats = _train("cold_start", config.to_json(), options, prepared,
                                    stop_after_epoch=args.cold_start_only)
    summary.update(_cold_start(cold_model, cold_stats, cold_items, data, split, args.prior_weights,
                               args.prior_scales, args.new_item_slots))
    summary.update({"cold_start_only": True, "epochs_run": args.cold_start_only, "seed": args.seed,
                    "trainings_wall_seconds": round(time.perf_counter() - started, 1),
                    "torch_threads_per_training": options["threads"], "config": config.to_dict()})
    print(_cold_start_line(summary))
    _harness.print_summary(summary, sort_keys=True)
    return 0


def served_popularity(histories, table_size: int) -> np.ndarray:
    """Item popularity as the features service keeps it (services/features/item_stats.py: the
    event weights summed) over the interactions in ``histories``; not decayed, because the
    leave-one-out data have no common clock (Beauty's timestamps are synthetic, per user)."""
    weights = np.zeros(NUM_EVENT_TYPES, np.float64)
    for event_type in EventType:
        weights[int(event_type)] = EVENT_WEIGHTS.get(event_type.name.lower(), 0.0)
    popularity = np.zeros(table_size, np.float64)
    for history in histories:
        np.add.at(popularity, history.items, weights[history.events])
    popularity[0] = 0.0
    return popularity


def _id_less_and_popularity(cases, training_histories: dict, data: InteractionData):
    """Which items have no learned id (no interaction in ``training_histories``) and their served
    popularity from what is visible at prediction time (every case's history, never a target)."""
    table_size = data.item_ids.table_size
    id_less = popularity_counts(training_histories.values(), table_size) == 0
    id_less[0] = False
    return id_less, served_popularity((case.history for case in cases), table_size)


def _slot_inputs(cases, training_histories: dict, data: InteractionData, config: ModelConfig):
    """What the ranker has for these cases: which items have no learned id, their served
    popularity, the candidates of the new-item slots (the most popular id-less items with
    traction, services/model/new_items.py) and the id-less prior every item's score gets first
    (the model's id_less_popularity_weight, 0 by default)."""
    id_less, popularity = _id_less_and_popularity(cases, training_histories, data)
    base = id_less_popularity_prior(popularity, id_less, config.id_less_popularity_weight,
                                    config.id_less_popularity_scale)
    ids = np.flatnonzero(id_less)
    candidates = np.zeros(len(id_less), bool)
    candidates[new_item_candidates(ids, popularity[ids])] = True   # the ranker's: the most popular
    return id_less, popularity, candidates, base


def cold_start_figures(model: DeltaRecModel, cases, cold_items: np.ndarray, training_histories: dict,
                       data: InteractionData, weight: float, scale: float, slots: int,
                       prefix: str = "cold_start_") -> dict:
    """The cold-start figures on ``cases`` for a model trained on ``training_histories`` (which
    lack ``cold_items``): on the targets that are held-out items, the served answer (the last
    ``slots`` of the top 10 reserved for new items with traction, ordered by model score +
    ``weight * log(1 + popularity / scale)``: services/model/new_items.py), the plain ranking
    without slots (``text_only_``: the held-out items' text path alone), and popularity; on all
    targets the served and plain figures (what the slots cost the other targets). Popularity and
    the slots' order count what is visible at prediction time: every case's history (never a
    target)."""
    id_less, popularity, candidates, base = _slot_inputs(cases, training_histories, data, model.config)
    order = id_less_popularity_prior(popularity, id_less, weight, scale)[None, :]
    held_out = np.isin([case.target_item for case in cases], cold_items)
    cold_cases = [case for case, held in zip(cases, held_out) if held]
    out: dict = {f"{prefix}cases": len(cold_cases), f"{prefix}new_item_slots": slots,
                 f"{prefix}new_item_popularity_weight": weight, f"{prefix}new_item_popularity_scale": scale}
    counts = popularity_counts((case.history for case in cases), data.item_ids.table_size)
    for mask, tag in ((False, ""), (True, "history_masked_")):
        served = ranks_with_new_item_slots(model, cases, data.item_text, candidates, order, slots,
                                           score_bias=base, mask_history=mask)[0]
        plain = rank_targets_with_biases(model, cases, data.item_text, base[None, :], mask_history=mask)[0]
        for name, rows in (("", held_out), ("all_targets_", np.ones_like(held_out))):
            out.update(_rounded(metrics_from_ranks(served[rows]), f"{prefix}{name}{tag}"))
            out.update(_rounded(metrics_from_ranks(plain[rows]), f"{prefix}{name}text_only_{tag}"))
        out.update(_rounded(evaluate_popularity(cold_cases, counts, mask_history=mask), f"{prefix}popularity_{tag}"))
    for metric in ("recall_at_10", "ndcg_at_10"):
        reference = out[f"{prefix}popularity_{metric}"]
        out[f"{prefix}ratio_{metric}_vs_popularity"] = _ratio(out[f"{prefix}{metric}"], reference) if reference else None
        out[f"{prefix}text_only_ratio_{metric}_vs_popularity"] = (
            _ratio(out[f"{prefix}text_only_{metric}"], reference) if reference else None)
        plain_all = out[f"{prefix}all_targets_text_only_{metric}"]
        out[f"{prefix}all_targets_ratio_{metric}_slots_vs_none"] = (
            _ratio(out[f"{prefix}all_targets_{metric}"], plain_all) if plain_all else None)
    return out


def choose_new_item_order(model: DeltaRecModel, cases, cold_items: np.ndarray, training_histories: dict,
                          data: InteractionData, weights, scales, slots: int) -> tuple[float, float, list[dict]]:
    """The order of the new-item slots (weight, scale of the popularity term) with the best
    NDCG@10 on the held-out ``cases`` targets (validation): the order only ranks new items among
    themselves, so what it decides is which held-out item a slot shows; what the slots cost the
    other targets is their number's, reported beside. Each pair's figures (all targets and
    held-out targets); weight 0 (text score alone) is tried once."""
    id_less, popularity, candidates, base = _slot_inputs(cases, training_histories, data, model.config)
    pairs = [(float(w), float(c)) for w in weights for c in scales if w > 0] + [(0.0, 1.0)]
    orders = np.stack([id_less_popularity_prior(popularity, id_less, w, c) for w, c in pairs])
    held_out = np.isin([case.target_item for case in cases], cold_items)
    ranks = ranks_with_new_item_slots(model, cases, data.item_text, candidates, orders, slots, score_bias=base)
    sweep = []
    for (weight, scale), row in zip(pairs, ranks):
        every, held = metrics_from_ranks(row), metrics_from_ranks(row[held_out])
        sweep.append({"weight": weight, "scale": scale,
                      **{f"all_{m}": round(every[m], 5) for m in ("recall_at_10", "ndcg_at_10")},
                      **{f"held_out_{m}": round(held[m], 5) for m in ("recall_at_10", "ndcg_at_10")}})
    best = max(sweep, key=lambda entry: (entry["held_out_ndcg_at_10"], -entry["weight"]))
    return best["weight"], best["scale"], sweep


def _pick(figures: dict, prefix: str) -> dict:
    return {m: figures[prefix + m] for m in METRICS if prefix + m in figures}


def _brief(figures: dict) -> str:
    return " ".join(f"{m}={figures[m]:.4f}" for m in METRICS if m in figures)


if __name__ == "__main__":
    sys.exit(main())
