"""The canary decider loop of the consistency service: every CANARY_DECIDE_INTERVAL_S, read
`model/current` and `model/canary`, evaluate the window's online metrics with the CANARY_*
policy (services/feedback/evaluation.py) and, when it says promote or abort, apply the decision
through the CanaryDecider: on the lease `canary/decider`, one etcd transaction over the pointers
it read, recorded in model_versions and History. Every instance evaluates (OnlineMetrics reports
it); only one writes: the one holding the feedback stream (a standby's figures are stale) and the
lease. A failed look is logged and the next period retries.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

from services.common.etcd import Etcd
from services.consistency import metrics
from services.consistency.feedback_stream import FeedbackStream
from services.consistency.replicas import Replicas
from services.feedback.decider import CanaryDecider, read_pointers
from services.feedback.evaluation import CanaryEvaluator, Evaluation
from services.feedback.policy import ABORT, PROMOTE, CanaryPolicyConfig
from services.feedback.variant_outcomes import outcomes_from_registrations

log = logging.getLogger(__name__)


class CanaryLoop:
    def __init__(self, etcd: Etcd, engine, feedback: FeedbackStream, policy: CanaryPolicyConfig, holder_id: str,
                 *, interval_s: float, ttl_s: int, clock=time.time) -> None:
        self.etcd, self.feedback, self.policy = etcd, feedback, policy
        self.interval_s, self.clock = interval_s, clock
        self.decider = CanaryDecider(etcd, engine, holder_id, ttl_s)
        self.evaluator = CanaryEvaluator(policy)
        self.replicas = Replicas(etcd)     # only its registrations are read: the error rates
        self.last: Evaluation | None = None
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "CanaryLoop":
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="canary-decider", daemon=True)
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def holds_lease(self) -> bool:
        return self.decider.leadership.held

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        metrics.CANARY_DECIDER_RUNNING.set(0)
        try:
            self.decider.leadership.resign()
        except Exception:  # noqa: BLE001 - the lease expires by itself
            pass

    def _run(self) -> None:
        metrics.CANARY_DECIDER_RUNNING.set(1)
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
                self.last_error = ""
            except Exception as error:  # noqa: BLE001 - etcd or Postgres away: the next period retries
                self.last_error = f"{type(error).__name__}: {error}"[:300]
                log.warning("canary evaluation failed", extra={"error": self.last_error})
        metrics.CANARY_DECIDER_RUNNING.set(0)

    def _outcomes(self) -> dict[tuple[int, str], tuple[int, int]]:
        return outcomes_from_registrations(r.value for r in self.replicas.registrations())

    def evaluate(self) -> Evaluation:
        """One look, without writing anything (also what OnlineMetrics shows between looks)."""
        seen = read_pointers(self.etcd)
        return self.evaluator.evaluate(self.feedback.window(), seen.current.version if seen.current else 0,
                                       seen.canary.version if seen.canary else 0, self.clock(),
                                       self._outcomes())

    def run_once(self) -> Evaluation:
        seen = read_pointers(self.etcd)
        evaluation = self.evaluator.evaluate(self.feedback.window(), seen.current.version if seen.current else 0,
                                             seen.canary.version if seen.canary else 0, self.clock(),
                                             self._outcomes())
        if evaluation.canary_version and evaluation.tested:
            metrics.CANARY_P_VALUE.labels(str(evaluation.canary_version)).set(evaluation.p_value)
        if evaluation.state in (PROMOTE, ABORT):
            written = False
            if self.feedback.live:
                written = self.decider.apply(evaluation.decision, seen)
            else:
                log.info("canary decision reached but not written: this instance does not hold the feedback "
                         "stream", extra={"action": evaluation.state, "canary_version": evaluation.canary_version})
            evaluation = dataclasses.replace(evaluation, written=written)
            metrics.CANARY_DECISIONS.labels(evaluation.state, "yes" if written else "no").inc()
        self.last = evaluation
        return evaluation
