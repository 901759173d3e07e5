"""The canary's statistical test: a mixture sequential probability ratio test (mSPRT) on the
difference of two proportions, with always-valid p-values (Johari, Pekelis, Walsh, "Always Valid
Inference: Continuous Monitoring of A/B Tests", 2017; the test Optimizely's stats engine runs).

Why this one: the decider looks at the metrics after every evaluation interval, for as long as
the canary runs. A fixed-horizon z-test re-run at every look rejects a true null far more often
than its alpha (peeking); the mSPRT's likelihood ratio, mixed over a normal prior N(0, tau^2) on
the effect, is a martingale under the null, so by Ville's inequality P(ever Lambda_n >= 1/alpha)
<= alpha however often and however long one looks, and stopping at any time is allowed. It needs
no planned sample size (a Bayesian or group-sequential design would), and it is two-sided: the same
alpha covers "canary better" (promote) and "canary worse" (abort).

The statistic uses the estimate's plug-in variance v = p_a(1-p_a)/n_a + p_b(1-p_b)/n_b (arms of
unequal size, as a canary share makes them):
    Lambda = sqrt(v / (v + tau^2)) * exp(theta^2 tau^2 / (2 v (v + tau^2))),  theta = p_b - p_a,
which is Johari et al.'s formula for the normal approximation. The always-valid p-value is the
running minimum of min(1, 1/Lambda).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    trials: int
    successes: int

    @property
    def rate(self) -> float:
        return self.successes / self.trials if self.trials else 0.0


@dataclass(frozen=True)
class TestResult:
    effect: float               # canary rate - control rate
    log_lambda: float           # log of the mixture likelihood ratio
    p_value: float              # always-valid p-value (this look alone; the caller keeps the running min)
    significant: bool

    def to_dict(self) -> dict:
        return {"effect": self.effect, "log_lambda": self.log_lambda, "p_value": self.p_value,
                "significant": self.significant}


def msprt(control: Arm, canary: Arm, *, alpha: float, tau: float) -> TestResult:
    """One look at the two arms. `tau`: the prior's standard deviation of the effect (the size of
    effect the test is most sensitive to; about the effect one expects)."""
    if control.trials == 0 or canary.trials == 0:
        return TestResult(0.0, 0.0, 1.0, False)
    pa, pb = control.rate, canary.rate
    # A rate of exactly 0 or 1 has no variance estimate: add half a success and half a failure.
    va = _bounded(pa, control.trials) * (1 - _bounded(pa, control.trials)) / control.trials
    vb = _bounded(pb, canary.trials) * (1 - _bounded(pb, canary.trials)) / canary.trials
    v, t2 = va + vb, tau * tau
    theta = pb - pa
    log_lambda = 0.5 * math.log(v / (v + t2)) + theta * theta * t2 / (2 * v * (v + t2))
    p_value = min(1.0, math.exp(-log_lambda)) if log_lambda < 700 else 0.0
    return TestResult(theta, log_lambda, p_value, log_lambda >= math.log(1.0 / alpha))


def _bounded(rate: float, trials: int) -> float:
    return min(max(rate, 0.5 / trials), 1 - 0.5 / trials)
