"""The evaluation gate: publish a candidate only if it is not worse than the current version
beyond a tolerance.

Both are evaluated NOW on the same most recent held-out slice (see `pipeline.prepare`), ranking
against all items, so the comparison is paired and fair: neither model has learned those
targets (the current version was trained before they existed or while they were held out).

Rule: passed iff candidate[metric] >= current[metric] * (1 - tolerance). The tolerance is
relative: on a few thousand held-out users the paired difference of two sound models moves by a
few percent from noise alone, while a broken model (wrong weights, bad data) loses far more; the
default (5% of NDCG@10) lets noise through and stops breakage.
"""
from __future__ import annotations

from dataclasses import dataclass

from services.trainer import pipeline
from services.trainer.model import DeltaRecModel


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    candidate: dict
    baseline: dict | None


def decide(candidate: dict, baseline: dict | None, metric: str = "ndcg_at_10",
           tolerance: float = 0.05) -> GateDecision:
    """Pure decision on two metric dicts (as `pipeline.evaluate` returns them)."""
    if baseline is None:
        return GateDecision(True, "passed: first version, no current version to compare with", candidate, None)
    if not candidate.get("users"):
        return GateDecision(True, "passed: no held-out interactions to compare on", candidate, baseline)
    value, reference = float(candidate[metric]), float(baseline[metric])
    floor = reference * (1.0 - tolerance)
    if value + 1e-12 >= floor:
        return GateDecision(True, f"passed: {metric} {value:.5f} vs current {reference:.5f} "
                                  f"(floor {floor:.5f} at tolerance {tolerance:g})", candidate, baseline)
    return GateDecision(False, f"rejected by the gate: {metric} {value:.5f} < floor {floor:.5f} "
                               f"(current {reference:.5f}, tolerance {tolerance:g})", candidate, baseline)


def evaluate_pair(candidate: DeltaRecModel, current: DeltaRecModel | None, prepared: "pipeline.Prepared",
                  metric: str = "ndcg_at_10", tolerance: float = 0.05) -> GateDecision:
    """Evaluates both models on the prepared held-out slice and decides. `current` must be in
    the prepared index space (see `pipeline.remap_items`)."""
    candidate_metrics = pipeline.evaluate(candidate, prepared)
    current_metrics = None if current is None else pipeline.evaluate(current, prepared)
    return decide(candidate_metrics, current_metrics, metric, tolerance)
