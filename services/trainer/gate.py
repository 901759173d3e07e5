"""The evaluation gate: publish a candidate only if it is not worse than the current version
beyond a per-step tolerance, AND not worse than the anchor (the newest published full
retrain) beyond a cumulative tolerance, both on the same fresh slice.

The slice is prequential (see `run_steps.prepare`): the latest interaction of the most recently
active users among the interactions that arrived AFTER the current version's training cutoff.
The candidate does not train on it, the current version and the anchor never saw it; the next
version trains on it (nothing is withheld for good). Candidate, current and anchor are evaluated
NOW on that slice, ranking against all items, so every comparison is paired and fair.

Rule, on the gate metric m (NDCG@10 by default), per held-out user u: d_u = candidate_u - other_u.
The candidate is refused when, against the current version (per-step) or the anchor
(cumulative), it falls short beyond the tolerance AND beyond the noise of the slice:

    mean(d) < -tolerance * mean(other) - z * stderr(d)

* `tolerance` (relative, default 5%) is how much worse than its parent a step may be;
* `cumulative_tolerance` (relative, default 5%) is how much worse than the last full retrain ANY
  chain of updates may become: since the anchor is re-evaluated on every step's slice, small
  per-step losses cannot compound past it (no ratchet). A candidate refused on this bound has
  `drift_exceeded` set: the training loop then schedules a full retrain (scheduler.py);
* `z * stderr(d)` (default z = 1.64, one-sided 95%) keeps noise from refusing sound updates. A
  broken model (damaged weights, bad data) loses far more than that and is refused;
* `min_users`: with fewer held-out cases than this, the metrics say nothing (a one-user slice
  scores 0 or 1); the candidate is then published with evidence 'insufficient' recorded in its
  decision, not gated on noise. Its drift is still caught: the next slice that has enough users
  compares the chain against the anchor again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.trainer import run_steps
from services.model.network import DeltaRecModel

SUFFICIENT, INSUFFICIENT, NO_BASELINE = "sufficient", "insufficient", "no_baseline"


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    candidate: dict
    baseline: dict | None
    anchor: dict | None = None            # the anchor's metrics on the same slice (None: not compared)
    evidence: str = SUFFICIENT            # sufficient | insufficient | no_baseline
    drift_exceeded: bool = False          # refused on the cumulative bound: a full retrain is due
    hold: bool = False                    # sound, but recorded only (a shadow full retrain not needed)


@dataclass(frozen=True)
class Comparison:
    """Candidate against one other model on the same slice."""
    passed: bool
    floor: float
    detail: str


def compare(value: float, reference: float, tolerance: float, differences: np.ndarray | None, z: float,
            metric: str, against: str) -> Comparison:
    """The one-sided rule of the module docstring, for one reference model."""
    noise = 0.0
    if differences is not None and z > 0 and len(differences) > 1:
        noise = z * float(np.std(differences, ddof=1)) / math.sqrt(len(differences))
    floor = reference - tolerance * reference - noise
    detail = (f"{metric} {value:.5f} vs {against} {reference:.5f}: floor {floor:.5f} "
              f"(tolerance {tolerance:g}" + (f", noise allowance {noise:.5f} at z={z:g}" if noise else "") + ")")
    return Comparison(value + 1e-12 >= floor, floor, detail)


def decide(candidate: dict, baseline: dict | None, metric: str = "ndcg_at_10", tolerance: float = 0.05, *,
           differences: np.ndarray | None = None, z: float = 0.0, anchor: dict | None = None,
           anchor_differences: np.ndarray | None = None, cumulative_tolerance: float = 0.05,
           min_users: int = 0) -> GateDecision:
    """Pure decision on metric dicts (as `run_steps.evaluate` returns them) and, optionally, the
    per-user paired differences of the metric (candidate - current, candidate - anchor)."""
    if baseline is None:
        return GateDecision(True, "passed: first version, no current version to compare with", candidate, None,
                            evidence=NO_BASELINE)
    users = int(candidate.get("users") or 0)
    if not users:
        return GateDecision(True, "passed on insufficient evidence: no held-out interactions to compare on",
                            candidate, baseline, anchor, INSUFFICIENT)
    if users < min_users:
        return GateDecision(True, f"passed on insufficient evidence: {users} held-out users, fewer than the "
                                  f"{min_users} the gate needs (metrics recorded, not gated)",
                            candidate, baseline, anchor, INSUFFICIENT)
    value = float(candidate[metric])
    step = compare(value, float(baseline[metric]), tolerance, differences, z, metric, "current")
    reasons = [step.detail]
    cumulative = None
    if anchor is not None:
        cumulative = compare(value, float(anchor[metric]), cumulative_tolerance, anchor_differences, z, metric,
                             "last full retrain")
        reasons.append(cumulative.detail)
    detail = "; ".join(reasons)
    if not step.passed:
        return GateDecision(False, f"rejected by the gate: {detail}", candidate, baseline, anchor)
    if cumulative is not None and not cumulative.passed:
        return GateDecision(False, f"rejected by the gate (cumulative bound; full retrain due): {detail}",
                            candidate, baseline, anchor, drift_exceeded=True)
    return GateDecision(True, f"passed: {detail}", candidate, baseline, anchor)


def drift(incremental: dict, full: dict, metric: str) -> float:
    """Relative shortfall of an incremental version against the full retrain on the same data and
    slice (0.02 = 2% below; negative: the update is better)."""
    reference = float(full.get(metric) or 0.0)
    return 0.0 if reference <= 0 else 1.0 - float(incremental.get(metric) or 0.0) / reference


def shadow_decision(decision: GateDecision, metric: str, drift_bound: float, shadowed: int) -> GateDecision:
    """A shadow full retrain (`decision.candidate`) measured against the incremental version it
    shadows (`decision.baseline`), on the same slice. Published (replacing the drifted chain) only
    when the update is more than `drift_bound` below it on enough users; else recorded only."""
    incremental, full = decision.baseline or {}, decision.candidate
    if decision.evidence != SUFFICIENT:
        return GateDecision(True, f"shadow of version {shadowed}: {int(full.get('users') or 0)} held-out users, "
                                  f"too few to measure drift; recorded only", full, incremental,
                            evidence=decision.evidence, hold=True)
    measured = drift(incremental, full, metric)
    detail = (f"shadow of version {shadowed}: {metric} {float(incremental.get(metric) or 0):.5f} incremental vs "
              f"{float(full[metric]):.5f} full, drift {measured:+.2%} (bound {drift_bound:.2%})")
    if measured > drift_bound:
        return GateDecision(True, f"passed: {detail}: the full retrain replaces the chain", full, incremental,
                            drift_exceeded=True)
    return GateDecision(True, f"{detail}: within the bound, recorded only", full, incremental, hold=True)


def evaluate_pair(candidate: DeltaRecModel, current: DeltaRecModel | None, prepared: "run_steps.Prepared",
                  metric: str = "ndcg_at_10", tolerance: float = 0.05, z: float = 0.0, *,
                  anchor: DeltaRecModel | None = None, cumulative_tolerance: float = 0.05,
                  min_users: int = 0) -> GateDecision:
    """Evaluates the candidate, the current version and the anchor (when given: the last full
    retrain, unless it is the current version itself) on the prepared held-out slice and decides.
    The models must be in the prepared index space (see `run_steps.remap_items`)."""
    candidate_ranks = run_steps.holdout_ranks(candidate, prepared)
    candidate_metrics = run_steps.metrics_of_ranks(candidate_ranks)
    if current is None:
        return decide(candidate_metrics, None, metric, tolerance)
    gains = run_steps.per_case_gains(candidate_ranks, metric)

    def versus(other: DeltaRecModel) -> tuple[dict, np.ndarray]:
        ranks = run_steps.holdout_ranks(other, prepared)
        return run_steps.metrics_of_ranks(ranks), gains - run_steps.per_case_gains(ranks, metric)

    current_metrics, differences = versus(current)
    anchor_metrics = anchor_differences = None
    if anchor is not None:
        anchor_metrics, anchor_differences = versus(anchor)
    return decide(candidate_metrics, current_metrics, metric, tolerance, differences=differences, z=z,
                  anchor=anchor_metrics, anchor_differences=anchor_differences,
                  cumulative_tolerance=cumulative_tolerance, min_users=min_users)
