"""The gate's cumulative bound, its minimum sample, the shadow full retrain's drift rule, and the
prequential held-out slice (pure logic)."""
from __future__ import annotations

import numpy as np
import pytest

from services.trainer import gate, run_steps
from services.trainer.interaction_log import Interaction


def m(value: float, users: int = 500) -> dict:
    return {"ndcg_at_10": value, "users": users}


def test_a_chain_of_small_losses_is_stopped_by_the_cumulative_bound():
    """Each step loses 3% against its parent (within the 5% step tolerance): without the anchor
    every step passes and the loss compounds; with it, the step that takes the chain more than
    5% below the last full retrain is refused and flags that a full retrain is due."""
    anchor, value, passed = 0.100, 0.100, []
    for _ in range(4):
        candidate = value * 0.97
        decision = gate.decide(m(candidate), m(value), tolerance=0.05, anchor=m(anchor), cumulative_tolerance=0.05)
        passed.append(decision.passed)
        assert gate.decide(m(candidate), m(value), tolerance=0.05).passed       # per step alone: a ratchet
        if decision.passed:
            value = candidate
    assert passed == [True, False, False, False]
    refused = gate.decide(m(0.100 * 0.97 ** 2), m(0.097), anchor=m(anchor))
    assert refused.drift_exceeded and "cumulative bound" in refused.reason and refused.anchor == m(anchor)
    assert value >= anchor * 0.95                                                 # the bound held


def test_the_cumulative_bound_allows_the_noise_of_the_slice():
    noisy = np.array([0.5, -0.5] * 250) - 0.07 * 0.1
    assert gate.decide(m(0.093), m(0.094), anchor=m(0.100), anchor_differences=noisy, z=1.64).passed
    assert not gate.decide(m(0.093), m(0.094), anchor=m(0.100), anchor_differences=np.full(500, -0.007),
                           z=1.64).passed


def test_a_small_slice_is_insufficient_evidence_not_a_gate():
    decision = gate.decide(m(0.0, users=1), m(1.0, users=1), anchor=m(1.0, users=1), min_users=100)
    assert decision.passed and decision.evidence == gate.INSUFFICIENT
    assert "insufficient evidence" in decision.reason and "1 held-out users" in decision.reason
    assert not gate.decide(m(0.0, users=100), m(0.1, users=100), min_users=100).passed
    first = gate.decide(m(0.1), None)
    assert first.passed and first.evidence == gate.NO_BASELINE


def test_shadow_full_retrain_replaces_the_chain_only_beyond_the_drift_bound():
    def shadow(incremental: float, full: float, users: int = 500) -> gate.GateDecision:
        measured = gate.GateDecision(True, "", m(full, users), m(incremental, users),
                                     evidence=gate.SUFFICIENT if users >= 100 else gate.INSUFFICIENT)
        return gate.shadow_decision(measured, "ndcg_at_10", 0.01, shadowed=7)

    within = shadow(0.0995, 0.1)
    assert within.passed and within.hold and not within.drift_exceeded and "within the bound" in within.reason
    beyond = shadow(0.098, 0.1)
    assert beyond.passed and not beyond.hold and beyond.drift_exceeded and "replaces the chain" in beyond.reason
    assert shadow(0.05, 0.1, users=3).hold                                      # too few users: recorded only
    assert gate.drift(m(0.098), m(0.1), "ndcg_at_10") == pytest.approx(0.02)


def rows(spec: list[tuple[str, int, int]]) -> list[Interaction]:
    """(user, number of interactions, commit LSN of the last one; the others at LSN 1)."""
    out, row = [], 0
    for user, count, last_lsn in spec:
        for step in range(count):
            row += 1
            out.append(Interaction(f"{user}-{step}", user, f"i{step}", "view", float(row),
                                   commit_lsn=last_lsn if step == count - 1 else 1, row_id=row))
    return out


def test_the_slice_is_prequential_and_the_next_version_trains_on_it():
    interactions = rows([("stale", 4, 1), ("fresh", 4, 5), ("fresh2", 3, 5)])
    prepared = run_steps.prepare(interactions, eval_users=10, holdout_after_lsn=1)
    held = {prepared.data.user_ids.external(case.user) for case in prepared.holdout}
    assert held == {"fresh", "fresh2"}                      # only interactions after the current cutoff
    assert run_steps.held_out_events(prepared) == ["fresh-3", "fresh2-2"]
    # the next version (cutoff 5, nothing newer) trains on them: they are new for it
    later = run_steps.prepare(interactions, eval_users=10, holdout_after_lsn=5)
    assert later.holdout == []
    new, _ = run_steps.new_interactions(later, after_lsn=5, retrain=["fresh-3", "fresh2-2"])
    assert sorted(n.key for n in new) == sorted([later.positions["fresh-3"], later.positions["fresh2-2"]])
    without, _ = run_steps.new_interactions(later, after_lsn=5)
    assert without == []
