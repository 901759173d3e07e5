"""The canary policy: promote, abort or keep collecting, from the window's metrics. Pure.

Settings (environment, CANARY_*; `CanaryPolicyConfig`):
  CANARY_METRIC          ctr | add_to_cart | purchase: the rate the test compares (default ctr)
  CANARY_ALPHA           the test's false-positive rate, over the whole canary (default 0.05)
  CANARY_TAU             the mSPRT prior's standard deviation of the effect (default 0.02)
  CANARY_MIN_IMPRESSIONS impressions each variant needs before any decision (default 500)
  CANARY_MAX_ERROR_RATE_INCREASE  abort when the canary's error rate exceeds the current's by
                         more than this (absolute, default 0.02)
  CANARY_MIN_REQUESTS    requests the canary needs served before its error rate can abort it
                         (default 100: one failure in the first few requests is not a rate)
A significant positive effect promotes, a significant negative one aborts (the two-sided mSPRT
spends one alpha on both); anything else keeps collecting.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from services.common.config import env
from services.feedback.sequential import Arm, msprt

PROMOTE, ABORT, CONTINUE = "promote", "abort", "continue"


@dataclasses.dataclass(frozen=True)
class CanaryPolicyConfig:
    metric: str = env("CANARY_METRIC", "ctr", choices=("ctr", "add_to_cart", "purchase"),
                      help="the rate the canary's sequential test compares")
    alpha: float = env("CANARY_ALPHA", 0.05, minimum=1e-6, maximum=0.5,
                       help="false-positive rate of the sequential test, valid under continuous monitoring")
    tau: float = env("CANARY_TAU", 0.02, minimum=1e-6, maximum=1.0,
                     help="mSPRT mixture prior: standard deviation of the effect on the rate")
    min_impressions: int = env("CANARY_MIN_IMPRESSIONS", 500, minimum=1,
                               help="impressions per variant before any decision")
    max_error_rate_increase: float = env("CANARY_MAX_ERROR_RATE_INCREASE", 0.02, minimum=0.0, maximum=1.0,
                                         help="abort when the canary's error rate exceeds the current's by this")
    min_requests: int = env("CANARY_MIN_REQUESTS", 100, minimum=1,
                            help="requests the canary must have served before its error rate can abort it")


@dataclass(frozen=True)
class VariantEvidence:
    arm: Arm
    requests: int = 0
    errors: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Decision:
    action: str
    reason: str
    evidence: dict


def decide(policy: CanaryPolicyConfig, current: VariantEvidence, canary: VariantEvidence) -> Decision:
    evidence = {"metric": policy.metric, "alpha": policy.alpha, "tau": policy.tau,
                "current": {"trials": current.arm.trials, "successes": current.arm.successes,
                            "rate": current.arm.rate, "requests": current.requests,
                            "errors": current.errors, "error_rate": current.error_rate},
                "canary": {"trials": canary.arm.trials, "successes": canary.arm.successes,
                           "rate": canary.arm.rate, "requests": canary.requests,
                           "errors": canary.errors, "error_rate": canary.error_rate}}
    if (canary.requests >= policy.min_requests
            and canary.error_rate - current.error_rate > policy.max_error_rate_increase):
        return Decision(ABORT, f"canary error rate {canary.error_rate:.3f} exceeds the current's "
                               f"{current.error_rate:.3f} by more than {policy.max_error_rate_increase}", evidence)
    if min(current.arm.trials, canary.arm.trials) < policy.min_impressions:
        return Decision(CONTINUE, f"collecting: {canary.arm.trials} canary and {current.arm.trials} current "
                                  f"impressions (need {policy.min_impressions} each)", evidence)
    result = msprt(current.arm, canary.arm, alpha=policy.alpha, tau=policy.tau)
    evidence["test"] = dict(result.to_dict(), name="mSPRT (normal mixture), always-valid p-value")
    if not result.significant:
        return Decision(CONTINUE, f"no significant difference yet (always-valid p {result.p_value:.3g})", evidence)
    if result.effect > 0:
        return Decision(PROMOTE, f"canary {policy.metric} better by {result.effect:+.4f} "
                                 f"(always-valid p {result.p_value:.3g} < {policy.alpha})", evidence)
    return Decision(ABORT, f"canary {policy.metric} worse by {result.effect:+.4f} "
                           f"(always-valid p {result.p_value:.3g} < {policy.alpha})", evidence)
