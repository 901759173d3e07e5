"""The evaluation gate: publish a candidate only if it is not worse than the current version
beyond a tolerance.

Both are evaluated NOW on the same most recent held-out slice (see `run_steps.prepare`), ranking
against all items, so the comparison is paired and fair: neither model has learned those
targets (the current version was trained before they existed or while they were held out).

Rule, on the gate metric (NDCG@10 by default), per held-out user u: d_u = candidate_u - current_u.
The candidate is refused when it is worse than the current version by more than the tolerance
AND the shortfall is larger than the noise of the slice:

    mean(d) < -tolerance * mean(current) - z * stderr(d)

* `tolerance` (relative, default 5%) is how much worse we accept by design;
* `z * stderr(d)` (default z = 1.64, one-sided 95%) keeps noise from refusing sound updates. On
  Beauty, Recall@10 is ~0.05: 2000 held-out users give ~100 hits, and a harmless fine-tune moves
  several of them, i.e. several percent, either way. A broken model (damaged weights, bad data)
  loses far more than that and is refused; z = 0 gives the plain mean-vs-mean rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.trainer import run_steps
from services.model.network import DeltaRecModel


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    candidate: dict
    baseline: dict | None


def decide(candidate: dict, baseline: dict | None, metric: str = "ndcg_at_10", tolerance: float = 0.05, *,
           differences: np.ndarray | None = None, z: float = 0.0) -> GateDecision:
    """Pure decision on two metric dicts (as `run_steps.evaluate` returns them) and, optionally,
    the per-user paired differences of the metric (candidate - current)."""
    if baseline is None:
        return GateDecision(True, "passed: first version, no current version to compare with", candidate, None)
    if not candidate.get("users"):
        return GateDecision(True, "passed: no held-out interactions to compare on", candidate, baseline)
    value, reference = float(candidate[metric]), float(baseline[metric])
    margin = tolerance * reference
    noise = 0.0
    if differences is not None and z > 0 and len(differences) > 1:
        noise = z * float(np.std(differences, ddof=1)) / math.sqrt(len(differences))
    floor = reference - margin - noise
    detail = (f"{metric} {value:.5f} vs current {reference:.5f}: floor {floor:.5f} "
              f"(tolerance {tolerance:g}" + (f", noise allowance {noise:.5f} at z={z:g}" if noise else "") + ")")
    if value + 1e-12 >= floor:
        return GateDecision(True, f"passed: {detail}", candidate, baseline)
    return GateDecision(False, f"rejected by the gate: {detail}", candidate, baseline)


def evaluate_pair(candidate: DeltaRecModel, current: DeltaRecModel | None, prepared: "run_steps.Prepared",
                  metric: str = "ndcg_at_10", tolerance: float = 0.05, z: float = 0.0) -> GateDecision:
    """Evaluates both models on the prepared held-out slice and decides. `current` must be in
    the prepared index space (see `run_steps.remap_items`)."""
    candidate_ranks = run_steps.holdout_ranks(candidate, prepared)
    candidate_metrics = run_steps.metrics_of_ranks(candidate_ranks)
    if current is None:
        return decide(candidate_metrics, None, metric, tolerance)
    current_ranks = run_steps.holdout_ranks(current, prepared)
    differences = (run_steps.per_case_gains(candidate_ranks, metric)
                   - run_steps.per_case_gains(current_ranks, metric))
    return decide(candidate_metrics, run_steps.metrics_of_ranks(current_ranks), metric, tolerance,
                  differences=differences, z=z)
