"""One look at the canary: the window's arms of `model/current` and `model/canary`, the policy's
decision, and the test statistic for reporting (always-valid p-value as the running minimum
over this canary's looks, as the mSPRT's definition has it). Pure; the consistency service's
decider loop (services/consistency/canary_loop.py) reads the pointers and applies decisions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from services.feedback.online_metrics import Counters
from services.feedback.policy import CONTINUE, CanaryPolicyConfig, Decision, VariantEvidence, decide

NO_CANARY, COLLECTING = "no_canary", "collecting"


@dataclass(frozen=True)
class Evaluation:
    state: str                   # NO_CANARY, COLLECTING, or the decision's action (promote / abort)
    current_version: int
    canary_version: int
    decision: Decision | None
    at: float
    p_value: float = 1.0         # always-valid p: running minimum over this canary's looks
    log_lambda: float = 0.0
    effect: float = 0.0
    tested: bool = False
    written: bool = False        # the decision was written (this instance held the lease, CAS held)
    extra: dict = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return self.decision.reason if self.decision else "no canary published (model/canary unset)"

    def evidence_json(self) -> str:
        return json.dumps(self.decision.evidence, default=str, sort_keys=True) if self.decision else "{}"


def evidence_of(counters: Counters | None, metric: str, outcomes: tuple[int, int] = (0, 0)) -> VariantEvidence:
    """The variant's arm from the window, and its (requests, errors) as the rankers count them
    (services/feedback/variant_outcomes.py) for the error-rate abort."""
    requests, errors = outcomes
    return VariantEvidence(arm=(counters or Counters()).arm(metric), requests=requests, errors=errors)


class CanaryEvaluator:
    def __init__(self, policy: CanaryPolicyConfig) -> None:
        self.policy = policy
        self._min_p: dict[int, float] = {}       # canary version -> running minimum of the p-value

    def evaluate(self, window: dict[tuple[int, str], Counters], current_version: int, canary_version: int,
                 now: float, outcomes: dict[tuple[int, str], tuple[int, int]] | None = None) -> Evaluation:
        """`outcomes`: (version, variant) -> (requests, errors) summed over the rankers."""
        if not canary_version:
            return Evaluation(NO_CANARY, current_version, 0, None, now)
        outcomes = outcomes or {}
        current = evidence_of(window.get((current_version, "current")), self.policy.metric,
                              outcomes.get((current_version, "current"), (0, 0)))
        canary = evidence_of(window.get((canary_version, "canary")), self.policy.metric,
                             outcomes.get((canary_version, "canary"), (0, 0)))
        decision = decide(self.policy, current, canary)
        test = decision.evidence.get("test")
        p_value = self._min_p.get(canary_version, 1.0)
        if test is not None:
            p_value = min(p_value, float(test["p_value"]))
            self._min_p[canary_version] = p_value
        state = COLLECTING if decision.action == CONTINUE else decision.action
        return Evaluation(state, current_version, canary_version, decision, now, p_value=p_value,
                          log_lambda=float(test["log_lambda"]) if test else 0.0,
                          effect=float(test["effect"]) if test else canary.arm.rate - current.arm.rate,
                          tested=test is not None)
