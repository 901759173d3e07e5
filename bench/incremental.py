"""Incremental update vs full retrain, measured on Amazon Beauty.

    .venv/bin/python bench/incremental.py            # all users, 5 steps of 1%
    .venv/bin/python bench/incremental.py --quick    # < ~60 s: 2000 users, 8 epochs, 2 steps
    .venv/bin/python bench/incremental.py --epochs 10 --steps 5 --step-share 0.01
    .venv/bin/python bench/incremental.py --steps 2 --seeds 3   # judged on 3 seeds a side (~35 min)

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

Targets, checked at EVERY step and printed per step: an update of a 1% delta in <= 5% of the
full-retrain time, accuracy within 1% (incremental / full >= 0.99 on Recall@10 and NDCG@10).

The trainer's drift bound is simulated too (`--shadow-every N`, `--drift-bound`, the defaults of
TRAINER_SHADOW_FULL_EVERY / TRAINER_DRIFT_BOUND): after every N steps the step's full retrain is
the shadow the trainer would run; when the chain is more than the bound below it (gate metric
NDCG@10), the full model replaces the chain (the next steps warm-start from it). "served" is what
the trainer would serve at each step; the amortised cost counts the shadow retrains.

`--variant name:lr=..,replay=..,epochs=..,anchor=..,avg=..,freeze=1,from=uniform` (repeatable) runs further
incremental chains against the same per-step full retrains (the reference is trained once per
step), to compare policies without paying for the reference again: learning rate, replay ratio,
epochs, the pull toward the parent's weights (`anchor`), weight averaging with the parent (`avg`),
frozen id rows of unchanged items (`freeze`) and where replayed examples come from (`from`:
own_history, the default, or uniform) — see training.IncrementalPolicy. The "trainer"
chain follows the trainer's defaults (TrainerConfig: TRAINER_MODEL_INCREMENTAL_LR / _EPOCHS,
TRAINER_STRATEGY_REPLAY_RATIO, TRAINER_INCREMENTAL_*).

Statistical resolution: every ratio comes with a paired bootstrap 95% interval over the test users
(`--bootstrap` resamples of the users, the same resample for both models), and each step's verdict
says whether 1% is resolved: "met" (interval above 0.99), "missed" (interval below 0.99) or
"unresolved" (0.99 inside the interval; the point ratio is printed beside it). `--reference-seed`
trains, at the last step, a second full retrain with another seed: its ratio to the first is the
noise between two equally valid full retrains, the floor under any "within 1%" claim. `--seeds K`
runs the whole protocol K times (seeds --seed .. --seed+K-1: step 0, the full retrains and the
chains) and judges each step by the mean of the K chains against the mean of the K full retrains,
with the same paired bootstrap over the users (a user's gains summed over the seeds); the
reference's own spread is printed beside it (each seed's full retrain against the others' mean).
With K > 1 the summary's verdicts are the pooled ones; the first seed's stay under `per_step`.

Progress goes to stderr; the per-step table to stdout; the LAST stdout line is one JSON object
with the full-retrain reference measured in this run, each step and the ratios.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from services.trainer.config import TrainerConfig
from services.trainer.evaluation import evaluate_popularity, metrics_from_ranks, popularity_counts, rank_targets
from services.trainer.interaction_log import Interaction
from services.trainer.leave_one_out import EvalCase
from services.trainer.training import IncrementalPolicy

QUICK_USERS, QUICK_EPOCHS, QUICK_STEPS = 2000, 8, 2
TARGET_TIME_RATIO, TARGET_ACCURACY_RATIO = 0.05, 0.99


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_USERS} users, {QUICK_EPOCHS} epochs, "
                                                             f"{QUICK_STEPS} steps (< ~60 s)")
    parser.add_argument("--data-dir", type=Path, default=_harness.beauty_dir())
    parser.add_argument("--users", type=int, default=None, help="only the first N users")
    parser.add_argument("--epochs", type=int, default=None, help="full-training epochs (default: ModelConfig)")
    parser.add_argument("--steps", type=int, default=None, help="delta steps (default 5; quick 2)")
    parser.add_argument("--step-share", type=float, default=0.01, help="interactions per step / all training ones")
    parser.add_argument("--dim", type=int, default=None, help="model dimension (default: ModelConfig)")
    parser.add_argument("--negatives", type=int, default=None,
                        help="uniform negatives per batch (default: ModelConfig; the main cost of a training)")
    parser.add_argument("--replay-ratio", type=float, default=TrainerConfig.replay_ratio)
    parser.add_argument("--priority", default="", choices=("", *strategies.PRIORITIES))
    parser.add_argument("--top-share", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--incremental-lr", type=float, default=TrainerConfig.incremental_learning_rate,
                        help="default: TRAINER_MODEL_INCREMENTAL_LR")
    parser.add_argument("--incremental-epochs", type=int, default=TrainerConfig.incremental_epochs,
                        help="default: TRAINER_MODEL_INCREMENTAL_EPOCHS")
    parser.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples of the test users")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run the protocol with K seeds (--seed .. --seed+K-1) and judge the mean of the K "
                             "chains against the mean of the K full retrains (the seed noise of one full retrain "
                             "is ~2%% here, more than the 1%% target); prints each seed's full retrain against "
                             "the others' mean")
    parser.add_argument("--reference-seed", action="store_true",
                        help="at the last step, a second full retrain with another seed (the reference's own noise)")
    parser.add_argument("--shadow-every", type=int, default=TrainerConfig.shadow_full_every,
                        help="shadow full retrain after every N steps (0 = never; default TRAINER_SHADOW_FULL_EVERY)")
    parser.add_argument("--drift-bound", type=float, default=TrainerConfig.drift_bound)
    parser.add_argument("--variant", action="append", default=[],
                        metavar="NAME:lr=X,replay=Y,epochs=Z,anchor=A,avg=W,freeze=0|1,from=own_history|uniform",
                        help="another incremental chain against the same full retrains")
    return parser.parse_args()


@dataclasses.dataclass
class Chain:
    """One incremental policy followed over the steps (its model, id table and cost)."""
    name: str
    learning_rate: float
    replay_ratio: float
    epochs: int
    policy: IncrementalPolicy = IncrementalPolicy()
    model: object = None
    item_ids: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    shadow_seconds: float = 0.0
    replaced_at: list = dataclasses.field(default_factory=list)
    vectors: tuple = ((), None)         # the item-vector table of its last version (ids, vectors)


def parse_variant(text: str, default: Chain) -> Chain:
    name, _, spec = text.partition(":")
    values = dict(part.split("=", 1) for part in spec.split(",") if part)
    unknown = set(values) - {"lr", "replay", "epochs", "anchor", "avg", "freeze", "from"}
    if not name or unknown:
        raise SystemExit(f"--variant {text!r}: NAME:lr=..,replay=..,epochs=..,anchor=..,avg=..,freeze=..,from=.. "
                         f"(unknown: {sorted(unknown)})")
    policy = IncrementalPolicy(anchor=float(values.get("anchor", default.policy.anchor)),
                               parent_weight=float(values.get("avg", default.policy.parent_weight)),
                               freeze_items=bool(int(values.get("freeze", int(default.policy.freeze_items)))),
                               replay_from=values.get("from", default.policy.replay_from))
    try:
        policy.validate()
    except ValueError as error:
        raise SystemExit(f"--variant {text!r}: {error}") from None
    return Chain(name, float(values.get("lr", default.learning_rate)), float(values.get("replay", default.replay_ratio)),
                 int(values.get("epochs", default.epochs)), policy)


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


def ranks_of(model, prepared, tests) -> np.ndarray:
    """0-based rank of each test user's target (users in sorted order: paired across models)."""
    return rank_targets(model, cases_for(prepared, tests), prepared.data.item_text)


def metrics(ranks: np.ndarray) -> dict:
    figures = metrics_from_ranks(ranks)
    return {"recall_at_10": round(figures["recall_at_10"], 5), "ndcg_at_10": round(figures["ndcg_at_10"], 5)}


def per_user_gains(ranks: np.ndarray) -> dict[str, np.ndarray]:
    hit = ranks < 10
    return {"recall_at_10": hit.astype(np.float64), "ndcg_at_10": np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)}


def bootstrap_ratio_interval(candidate: np.ndarray, reference: np.ndarray, resamples: int, seed: int,
                             level: float = 0.95) -> tuple[float, float] | None:
    """Paired bootstrap interval of mean(candidate) / mean(reference) over the same users: each
    resample draws users with replacement and keeps both models' gains of a drawn user together."""
    if resamples <= 0 or len(reference) == 0:
        return None
    rng = np.random.default_rng(seed)
    ratios = []
    for start in range(0, resamples, 200):
        draw = rng.integers(0, len(reference), size=(min(200, resamples - start), len(reference)))
        denominators = reference[draw].sum(axis=1)
        ratios.append(np.where(denominators > 0, candidate[draw].sum(axis=1) / np.maximum(denominators, 1e-12),
                               np.nan))
    ratios = np.concatenate(ratios)
    tail = (1.0 - level) / 2.0
    return round(float(np.nanquantile(ratios, tail)), 4), round(float(np.nanquantile(ratios, 1.0 - tail)), 4)


def resolution_verdict(point: float | None, interval: tuple[float, float] | None) -> str:
    """met / missed when the interval is on one side of the 1% target, else unresolved."""
    if interval is None or point is None:
        return "unresolved"
    if interval[0] >= TARGET_ACCURACY_RATIO:
        return "met"
    if interval[1] < TARGET_ACCURACY_RATIO:
        return "missed"
    return "unresolved"


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
    table = run_steps.item_vector_table(model, prepared, catalog)
    return model, prepared, clock.stop(), table


def incremental_run(parent, parent_ids, interactions, catalog, vectors, after_lsn, strategy, seed, chain):
    clock = Clock()
    prepared = run_steps.prepare(interactions, item_prefix=parent_ids, catalog_items=catalog, eval_users=0)
    run_steps.set_item_text(prepared, vectors)
    new, old_counts = run_steps.new_interactions(prepared, after_lsn)
    selection = strategies.select(new, strategy, max(i.occurred_at for i in interactions), old_counts)
    model = run_steps.remap_items(parent, parent_ids, prepared.data.item_ids)
    model.config = dataclasses.replace(model.config, incremental_learning_rate=chain.learning_rate,
                                       incremental_epochs=chain.epochs)
    stats = run_steps.run_incremental(model, prepared, run_steps.examples_of(selection.selected),
                                     chain.replay_ratio, seed=seed, policy=chain.policy)
    table = run_steps.item_vector_table(model, prepared, catalog)
    return model, prepared, clock.stop(), selection, stats, table


def ratio(value: float, reference: float) -> float | None:
    return round(value / reference, 4) if reference else None


def step_row(chain: Chain, figures: dict, full: dict, seconds: float, cpu: float, full_seconds: float,
             full_cpu: float, gains: dict | None = None, full_gains: dict | None = None, resamples: int = 0,
             seed: int = 0) -> dict:
    """One chain's figures at one step, its ratios to the full retrain (with their paired bootstrap
    intervals) and whether each target holds."""
    row = {"incremental_seconds": round(seconds, 3), "incremental_cpu_seconds": round(cpu, 3),
           "time_ratio": round(seconds / full_seconds, 5), "cpu_time_ratio": round(cpu / full_cpu, 5) if full_cpu else None,
           "incremental": figures, "recall_at_10_ratio": ratio(figures["recall_at_10"], full["recall_at_10"]),
           "ndcg_at_10_ratio": ratio(figures["ndcg_at_10"], full["ndcg_at_10"])}
    row["meets_time"] = row["time_ratio"] <= TARGET_TIME_RATIO
    row["meets_recall"] = (row["recall_at_10_ratio"] or 0) >= TARGET_ACCURACY_RATIO
    row["meets_ndcg"] = (row["ndcg_at_10_ratio"] or 0) >= TARGET_ACCURACY_RATIO
    for metric in ("recall_at_10", "ndcg_at_10"):
        interval = (bootstrap_ratio_interval(gains[metric], full_gains[metric], resamples, seed)
                    if gains is not None and full_gains is not None else None)
        row[f"{metric}_ratio_ci95"] = interval
        row[f"{metric}_verdict"] = resolution_verdict(row[f"{metric}_ratio"], interval)
    return row


@dataclasses.dataclass
class Replicate:
    """One seed's run of the whole protocol: step 0, then every step's full retrain and chains."""
    seed: int
    chains: list
    step0_seconds: float = 0.0
    step0_metrics: dict = dataclasses.field(default_factory=dict)
    rows: list = dataclasses.field(default_factory=list)
    # per step: {"full": per-user gains of the full retrain, chain name: the chain's} (users paired)
    gains: list = dataclasses.field(default_factory=list)
    last_prepared: object = None


def run_replicate(args, seed: int, chains: list, config, epochs: int, strategy, catalog, vectors, base, pool,
                  tests, chunk: int, steps: int, trainable: int) -> Replicate:
    """The protocol of the module docstring with one seed (step 0, full retrains and every chain's
    updates all seeded by it); prints the per-step table lines."""
    replicate = Replicate(seed, chains)
    fed = [Interaction(i.event_id, i.user_id, i.item_id, i.event_type, i.occurred_at, 1, i.row_id) for i in base]
    progress(f"seed {seed} step 0: full training on the starting data ({len(fed)} interactions)")
    model, prepared, (replicate.step0_seconds, _), table0 = full_run(fed, catalog, vectors, config, seed, epochs)
    replicate.step0_metrics = metrics(ranks_of(model, prepared, tests))
    progress(f"seed {seed} step 0: {replicate.step0_seconds:.1f}s {replicate.step0_metrics}")
    for chain in chains:
        chain.model, chain.item_ids = model, prepared.data.item_ids.external_ids()
        chain.vectors = table0

    for step in range(1, steps + 1):
        lsn = step + 1
        chunk_rows = pool[(step - 1) * chunk: step * chunk]
        fed = fed + [Interaction(i.event_id, i.user_id, i.item_id, i.event_type, i.occurred_at, lsn, i.row_id)
                     for i in chunk_rows]
        progress(f"seed {seed} step {step}: full retrain on {len(fed)} interactions")
        full_model, prepared_f, (seconds_f, cpu_f), table_f = full_run(fed, catalog, vectors, config, seed, epochs)
        ranks_f = ranks_of(full_model, prepared_f, tests)
        figures_f, gains_f = metrics(ranks_f), per_user_gains(ranks_f)
        replicate.last_prepared = prepared_f
        progress(f"seed {seed} step {step}: full {seconds_f:.1f}s {figures_f}")
        row = {"step": step, "delta_interactions": len(chunk_rows), "delta_share": round(len(chunk_rows) / trainable, 5),
               "full_seconds": round(seconds_f, 3), "full_cpu_seconds": round(cpu_f, 3), "full": figures_f,
               "chains": {}}
        step_gains = {"full": gains_f}
        shadow_step = args.shadow_every > 0 and step % args.shadow_every == 0
        for chain in chains:
            chain.model, prepared_i, (seconds_i, cpu_i), selection, stats, table_i = incremental_run(
                chain.model, chain.item_ids, fed, catalog, vectors, lsn - 1, strategy, seed, chain)
            chain.item_ids = prepared_i.data.item_ids.external_ids()
            chain.seconds += seconds_i
            ranks_i = ranks_of(chain.model, prepared_i, tests)
            figures_i, gains_i = metrics(ranks_i), per_user_gains(ranks_i)
            step_gains[chain.name] = gains_i
            entry = step_row(chain, figures_i, figures_f, seconds_i, cpu_i, seconds_f, cpu_f,
                             gains_i, gains_f, args.bootstrap, seed + step)
            entry.update(selected=len(selection.selected), replay_examples=stats.replay_examples,
                         vector_movement=_harness.vector_movement(chain.vectors, table_i))
            chain.vectors = table_i
            # the trainer's drift bound: the shadow full retrain replaces a chain that drifted past it
            served = figures_i
            if shadow_step:
                chain.shadow_seconds += seconds_f
                drift = 1.0 - figures_i["ndcg_at_10"] / figures_f["ndcg_at_10"] if figures_f["ndcg_at_10"] else 0.0
                entry["shadow_drift"] = round(drift, 4)
                if drift > args.drift_bound:
                    chain.model, chain.item_ids = full_model, prepared_f.data.item_ids.external_ids()
                    chain.vectors = table_f
                    chain.replaced_at.append(step)
                    served = figures_f
            entry["served"] = served
            entry["served_recall_at_10_ratio"] = ratio(served["recall_at_10"], figures_f["recall_at_10"])
            entry["served_ndcg_at_10_ratio"] = ratio(served["ndcg_at_10"], figures_f["ndcg_at_10"])
            row["chains"][chain.name] = entry
            met = ("R" if entry["meets_recall"] else "-") + ("N" if entry["meets_ndcg"] else "-") + \
                  ("T" if entry["meets_time"] else "-")
            print(f"{seed:>4} {step:>4} {chain.name[:8]:>8} {len(chunk_rows):>6} {seconds_i:>8.2f} {seconds_f:>8.1f} "
                  f"{entry['time_ratio']:>7.2%} {figures_i['recall_at_10']:>10.4f} {figures_f['recall_at_10']:>10.4f} "
                  f"{entry['recall_at_10_ratio']!s:>6} {figures_i['ndcg_at_10']:>10.4f} {figures_f['ndcg_at_10']:>10.4f} "
                  f"{entry['ndcg_at_10_ratio']!s:>6} {met:>10}"
                  f"  CI R {entry['recall_at_10_ratio_ci95']} {entry['recall_at_10_verdict']}"
                  f"  N {entry['ndcg_at_10_ratio_ci95']} {entry['ndcg_at_10_verdict']}"
                  f"  vectors moved {entry['vector_movement'].get('median', float('nan')):.2%} median"
                  f" / {entry['vector_movement'].get('p90', float('nan')):.2%} p90" + (f"  shadow: drift {entry['shadow_drift']:+.2%}"
                                                                   + (" -> replaced by the full retrain"
                                                                      if step in chain.replaced_at else "")
                                                                   if shadow_step else ""), flush=True)
        if args.reference_seed and step == steps:
            # the reference's own noise: another seed, same data and config
            progress(f"seed {seed} step {step}: second full retrain, seed {seed + 1}")
            other, prepared_o, (seconds_o, cpu_o), _ = full_run(fed, catalog, vectors, config, seed + 1, epochs)
            ranks_o = ranks_of(other, prepared_o, tests)
            seed_chain = Chain(f"full seed {seed + 1}", config.learning_rate, 0.0, epochs)
            entry = step_row(seed_chain, metrics(ranks_o), figures_f, seconds_o, cpu_o, seconds_f, cpu_f,
                             per_user_gains(ranks_o), gains_f, args.bootstrap, seed + step)
            row["full_other_seed"] = entry
            print(f"{seed:>4} {step:>4} {'fullseed':>8} {'':>6} {seconds_o:>8.1f} {seconds_f:>8.1f} {'':>7} "
                  f"{entry['incremental']['recall_at_10']:>10.4f} {figures_f['recall_at_10']:>10.4f} "
                  f"{entry['recall_at_10_ratio']!s:>6} {entry['incremental']['ndcg_at_10']:>10.4f} "
                  f"{figures_f['ndcg_at_10']:>10.4f} {entry['ndcg_at_10_ratio']!s:>6} {'':>10}"
                  f"  CI R {entry['recall_at_10_ratio_ci95']}  N {entry['ndcg_at_10_ratio_ci95']}", flush=True)
        replicate.rows.append(row)
        replicate.gains.append(step_gains)
    return replicate


def pooled_over_seeds(replicates: list[Replicate], chain_names: list[str], resamples: int, seed: int) -> dict:
    """Every chain's ratio to the full retrain with each side averaged over the seeds (the mean of K
    incremental chains against the mean of K full retrains: the seed noise of both sides averages
    out), its paired bootstrap interval over the users (a user's gains summed over the seeds stay
    together), and the reference's own spread: each seed's full retrain against the mean of the
    others, the noise a single full retrain carries."""
    per_step = []
    for index in range(min(len(r.rows) for r in replicates)):
        full_sum = {m: sum(r.gains[index]["full"][m] for r in replicates) for m in ("recall_at_10", "ndcg_at_10")}
        step = {"step": index + 1, "full_mean": {m: round(float(full_sum[m].mean()) / len(replicates), 5)
                                                 for m in full_sum}, "chains": {}}
        for name in chain_names:
            entry = {"time_ratio_mean": round(float(np.mean([r.rows[index]["chains"][name]["time_ratio"]
                                                             for r in replicates])), 5),
                     "time_ratio_max": max(r.rows[index]["chains"][name]["time_ratio"] for r in replicates)}
            for metric in ("recall_at_10", "ndcg_at_10"):
                candidate = sum(r.gains[index][name][metric] for r in replicates)
                point = ratio(float(candidate.sum()), float(full_sum[metric].sum()))
                interval = bootstrap_ratio_interval(candidate, full_sum[metric], resamples, seed + index + 1)
                entry[f"{metric}_ratio"] = point
                entry[f"{metric}_ratio_ci95"] = interval
                entry[f"{metric}_verdict"] = resolution_verdict(point, interval)
                entry[f"{metric}_ratio_per_seed"] = [r.rows[index]["chains"][name][f"{metric}_ratio"] for r in replicates]
            entry["meets_time"] = entry["time_ratio_max"] <= TARGET_TIME_RATIO
            entry["meets_accuracy"] = min(entry["recall_at_10_ratio"] or 0, entry["ndcg_at_10_ratio"] or 0) \
                >= TARGET_ACCURACY_RATIO
            step["chains"][name] = entry
        spread = {}
        for metric in ("recall_at_10", "ndcg_at_10"):
            ratios = []
            for r in replicates:
                own = r.gains[index]["full"][metric]
                others = (full_sum[metric] - own) / (len(replicates) - 1)
                ratios.append(ratio(float(own.sum()), float(others.sum())))
            spread[f"{metric}_full_vs_other_seeds"] = ratios
        step["reference_spread"] = spread
        per_step.append(step)
    return {"seeds": [r.seed for r in replicates],
            "what": "ratios of the mean over the seeds of each side (incremental chains / full retrains)",
            "per_step": per_step}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(max(1, min(2, args.threads)))
    if not (args.data_dir / "sequences.txt").is_file():
        return _harness.skip(f"Beauty data not found under {args.data_dir}")
    if args.seeds < 1:
        raise SystemExit("--seeds must be at least 1")
    users = args.users if args.users is not None else (QUICK_USERS if args.quick else None)
    config = ModelConfig()
    config = dataclasses.replace(config, dim=args.dim or config.dim, num_negatives=args.negatives or config.num_negatives)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else config.epochs)
    steps_wanted = args.steps or (QUICK_STEPS if args.quick else 5)
    strategy = strategies.Strategy(priority=args.priority, top_share=args.top_share,
                                   replay_ratio=args.replay_ratio).validate()

    def new_chains() -> list[Chain]:
        primary = Chain("trainer", args.incremental_lr, args.replay_ratio, args.incremental_epochs,
                        IncrementalPolicy(TrainerConfig.incremental_anchor, TrainerConfig.incremental_parent_weight,
                                          TrainerConfig.incremental_freeze_items,
                                          TrainerConfig.incremental_replay_from).validate())
        return [primary] + [parse_variant(text, primary) for text in args.variant]

    data, titles = load_beauty_interactions(args.data_dir, max_users=users)
    vectors = text_vectors(data, titles)
    catalog = data.item_ids.external_ids()
    base, pool, tests = split(data)
    trainable = len(base) + len(pool)
    chunk = max(1, math.ceil(args.step_share * trainable))
    steps = min(steps_wanted, len(pool) // chunk)
    progress(f"users={len(tests)} items={len(catalog)} training interactions={trainable} "
             f"(start {len(base)}, delta pool {len(pool)}); {steps} steps of {chunk} ({args.step_share:.1%}); "
             f"full epochs={epochs}; chains {[dataclasses.asdict(c) for c in new_chains()]}; strategy {strategy.name}; "
             f"shadow every {args.shadow_every}, drift bound {args.drift_bound}; seeds {args.seed}.."
             f"{args.seed + args.seeds - 1}")

    print(f"{'seed':>4} {'step':>4} {'chain':>8} {'delta':>6} {'incr s':>8} {'full s':>8} {'time':>7} "
          f"{'R@10 incr':>10} {'R@10 full':>10} {'ratio':>6} {'N@10 incr':>10} {'N@10 full':>10} {'ratio':>6} "
          f"{'1%/5% met':>10}")
    replicates = [run_replicate(args, args.seed + offset, new_chains(), config, epochs, strategy, catalog, vectors,
                                base, pool, tests, chunk, steps, trainable) for offset in range(args.seeds)]
    first = replicates[0]
    rows, chains = first.rows, first.chains
    primary = chains[0]
    seconds0, start_metrics = first.step0_seconds, first.step0_metrics

    popularity = evaluate_popularity(cases_for(first.last_prepared, tests), popularity_counts(
        first.last_prepared.data.histories.values(), first.last_prepared.data.item_ids.table_size)) if rows else {}
    full_mean = float(np.mean([r["full_seconds"] for r in rows])) if rows else None

    def chain_summary(chain: Chain) -> dict:
        entries = [r["chains"][chain.name] for r in rows]
        return {
            "learning_rate": chain.learning_rate, "replay_ratio": chain.replay_ratio, "epochs": chain.epochs,
            "policy": dataclasses.asdict(chain.policy),
            "verdicts": [(e["recall_at_10_verdict"], e["ndcg_at_10_verdict"]) for e in entries],
            "update_seconds_mean": round(chain.seconds / len(rows), 3) if rows else None,
            "time_ratio_max": max((e["time_ratio"] for e in entries), default=None),
            "recall_at_10_ratio_min": min((e["recall_at_10_ratio"] or 0 for e in entries), default=None),
            "ndcg_at_10_ratio_min": min((e["ndcg_at_10_ratio"] or 0 for e in entries), default=None),
            "steps_meeting_all": sum(e["meets_time"] and e["meets_recall"] and e["meets_ndcg"] for e in entries),
            "served_recall_at_10_ratio_min": min((e["served_recall_at_10_ratio"] or 0 for e in entries), default=None),
            "served_ndcg_at_10_ratio_min": min((e["served_ndcg_at_10_ratio"] or 0 for e in entries), default=None),
            "replaced_by_full_at_steps": chain.replaced_at,
            # ||v_new - v_old|| / ||v_old|| per item, per update: what the ranker's graph reuse faces
            "vector_movement_median_max": max((e["vector_movement"].get("median", 0.0) for e in entries), default=None),
            "vector_movement_p90_max": max((e["vector_movement"].get("p90", 0.0) for e in entries), default=None),
            # what keeping the model current cost per step, shadow retrains included, against a full retrain per step
            "amortised_time_ratio": round((chain.seconds + chain.shadow_seconds) / (len(rows) * full_mean), 4)
            if rows and full_mean else None,
        }

    chain_summaries = {chain.name: chain_summary(chain) for chain in chains}
    trainer = chain_summaries[primary.name]
    summary = {
        "benchmark": "incremental", "mode": "quick" if args.quick else "full", "pure_pipeline": True,
        "users": len(tests), "items": len(catalog), "training_interactions": trainable,
        "start_interactions": len(base), "delta_pool": len(pool), "steps": len(rows), "step_share": args.step_share,
        "full_epochs": epochs, "dim": config.dim, "num_negatives": config.num_negatives, "bootstrap_resamples": args.bootstrap, "strategy": strategy.to_dict(), "seed": args.seed,
        "torch_threads": torch.get_num_threads(), "shadow_every": args.shadow_every, "drift_bound": args.drift_bound,
        "step0": {"full_seconds": round(seconds0, 2), **start_metrics},
        "reference": {
            "what": "full retrain from scratch at each step, same config and epochs, measured in this run",
            "full_retrain_seconds_mean": round(full_mean, 2) if full_mean else None,
            "recall_at_10": rows[-1]["full"]["recall_at_10"] if rows else None,
            "ndcg_at_10": rows[-1]["full"]["ndcg_at_10"] if rows else None,
            "popularity_recall_at_10": round(popularity.get("recall_at_10", 0.0), 5),
            "popularity_ndcg_at_10": round(popularity.get("ndcg_at_10", 0.0), 5),
        },
        "chains": chain_summaries,
        "per_step": rows,
        "time_ratio_max": trainer["time_ratio_max"], "recall_at_10_ratio_min": trainer["recall_at_10_ratio_min"],
        "ndcg_at_10_ratio_min": trainer["ndcg_at_10_ratio_min"],
        "target": {"time_ratio_max": TARGET_TIME_RATIO, "accuracy_ratio_min": TARGET_ACCURACY_RATIO},
        "meets_time_target": trainer["time_ratio_max"] is not None and trainer["time_ratio_max"] <= TARGET_TIME_RATIO,
        "meets_accuracy_target": trainer["recall_at_10_ratio_min"] is not None
        and min(trainer["recall_at_10_ratio_min"], trainer["ndcg_at_10_ratio_min"]) >= TARGET_ACCURACY_RATIO,
        "served_meets_accuracy_target": trainer["served_recall_at_10_ratio_min"] is not None
        and min(trainer["served_recall_at_10_ratio_min"], trainer["served_ndcg_at_10_ratio_min"]) >= TARGET_ACCURACY_RATIO,
    }
    if len(replicates) > 1:
        # the verdicts above are the first seed's; with several seeds the pooled ratios decide
        pooled = pooled_over_seeds(replicates, [chain.name for chain in chains], args.bootstrap, args.seed)
        trainer_steps = [step["chains"][primary.name] for step in pooled["per_step"]]
        summary["pooled"] = pooled
        summary["first_seed_meets_accuracy_target"] = summary["meets_accuracy_target"]
        summary["meets_accuracy_target"] = all(step["meets_accuracy"] for step in trainer_steps)
        summary["meets_time_target"] = all(step["meets_time"] for step in trainer_steps)
        summary["recall_at_10_ratio_min"] = min(step["recall_at_10_ratio"] or 0 for step in trainer_steps)
        summary["ndcg_at_10_ratio_min"] = min(step["ndcg_at_10_ratio"] or 0 for step in trainer_steps)
        summary["pooled_verdicts"] = [(step["recall_at_10_verdict"], step["ndcg_at_10_verdict"]) for step in trainer_steps]
        for step in pooled["per_step"]:
            for name, entry in step["chains"].items():
                print(f"pooled step {step['step']} {name[:8]:>8}: R@10 {entry['recall_at_10_ratio']} "
                      f"{entry['recall_at_10_ratio_ci95']} {entry['recall_at_10_verdict']}  N@10 "
                      f"{entry['ndcg_at_10_ratio']} {entry['ndcg_at_10_ratio_ci95']} {entry['ndcg_at_10_verdict']}  "
                      f"time {entry['time_ratio_mean']:.2%} mean", flush=True)
            print(f"pooled step {step['step']} reference spread (each seed's full / the others'): "
                  f"R@10 {step['reference_spread']['recall_at_10_full_vs_other_seeds']}  "
                  f"N@10 {step['reference_spread']['ndcg_at_10_full_vs_other_seeds']}", flush=True)
    summary["seeds"] = [r.seed for r in replicates]
    _harness.print_summary(summary, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
