"""What OnlineMetrics answers, without gRPC: the request checked, the window's figures per
(model version, variant), the canary state (the decider loop's last look, or a look taken now
when the loop is off or has not looked yet) and the feedback consumer's position."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.common.errors import FailedPrecondition, InvalidArgument
from services.consistency.canary_loop import CanaryLoop
from services.consistency.feedback_stream import FeedbackStream
from services.consistency.versions import ModelVersions
from services.feedback.evaluation import Evaluation
from services.feedback.online_metrics import Counters
from services.feedback.recommendation_id import VARIANTS


@dataclass(frozen=True)
class OnlineReport:
    window_s: float
    attribution_s: float
    at: float
    variants: list[tuple[int, str, Counters]]
    evaluation: Evaluation | None
    last_decision: dict | None
    applied_lsn: int
    held: int
    counts: dict
    running: bool
    detail: str
    decider_running: bool = False
    decide_interval_s: float = 0.0
    holds_decider_lease: bool = False
    extra: dict = field(default_factory=dict)


class OnlineMetricsCore:
    def __init__(self, feedback: FeedbackStream | None, loop: CanaryLoop | None, versions: ModelVersions,
                 *, off_reason: str = "") -> None:
        self.feedback, self.loop, self.versions, self.off_reason = feedback, loop, versions, off_reason

    def report(self, window_s: float, model_version: int, variant: str) -> OnlineReport:
        if self.feedback is None:
            raise FailedPrecondition(f"online metrics are off here: {self.off_reason}")
        kept = self.feedback.settings.window_s
        if not math.isfinite(window_s) or window_s < 0:
            raise InvalidArgument("window_s: must be a finite number of seconds >= 0 (0 = the whole window)")
        if window_s > kept:
            raise InvalidArgument(f"window_s: at most {kept:g} (FEEDBACK_WINDOW_S, the window kept)")
        if variant and variant not in VARIANTS:
            raise InvalidArgument(f"variant: must be one of {', '.join(VARIANTS)} (or empty for both)")
        span = window_s or kept
        window = self.feedback.window(span)
        rows = sorted(((version, name, counters) for (version, name), counters in window.items()
                       if (not model_version or version == model_version) and (not variant or name == variant)),
                      key=lambda row: (row[0], row[1]))
        evaluation = None
        if self.loop is not None:
            evaluation = self.loop.last if self.loop.running and self.loop.last is not None else self.loop.evaluate()
        running, detail = self.feedback.status()
        join = self.feedback.join
        return OnlineReport(
            window_s=span, attribution_s=self.feedback.settings.attribution_s, at=self.feedback.clock(),
            variants=rows, evaluation=evaluation, last_decision=self.versions.last_canary_decision(),
            applied_lsn=join.applied_lsn, held=join.held, counts=dict(join.counts), running=running, detail=detail,
            decider_running=bool(self.loop and self.loop.running),
            decide_interval_s=self.loop.interval_s if self.loop else 0.0,
            holds_decider_lease=bool(self.loop and self.loop.holds_lease))
