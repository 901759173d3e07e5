"""The leader's scheduler: when to train, by itself, to keep the model current (the delta
stream is recorded meanwhile by stream_recorder.py, started on election).

Training, every TRAINER_LOOP_INTERVAL_S:
* first, once after each election, `recover()` finishes or abandons runs a crash left open;
* etcd has no `model/current` but `model_versions` has a published version (etcd lost its data):
  `restore_current()` publishes that version again (CAS on absence), whether the loop trains or not;
* no current version yet: a QUICK full training of TRAINER_FIRST_EPOCHS epochs (published: a new
  deployment serves personalised answers within minutes), then, as the next version, the full
  training of TRAINER_MODEL_EPOCHS (a hot swap); both as soon as the log holds
  TRAINER_MIN_INTERACTIONS interactions, the delta stream has caught up (the first model learns
  from everything already loaded, not from the first rows of the snapshot), and the feature
  store has text vectors for
  TRAINER_MIN_TEXT_COVERAGE of the active catalog (so that the trainer does not embed a whole
  catalog the features service is still embedding);
* with TRAINER_FULL_RETRAIN_GROWTH = g > 0: a full retraining once the log holds g times the
  interactions of the newest full version (a doubling schedule for g = 2: O(log n) full trainings
  as data grows, against the drift of a long chain of warm starts);
* otherwise: an incremental update with the configured strategy once the interactions pending
  since the current version reach the threshold (at least 1). After an update that did not
  publish (gate rejection, lost race, nothing selected), the next attempt waits until another
  threshold's worth of interactions arrived, so a rejected update is not retried on the same
  data in a tight loop;
* drift bound: an update refused on the gate's cumulative bound (more than
  TRAINER_GATE_CUMULATIVE_TOLERANCE below the last full retrain on the same slice) is followed at
  once by a full retrain; and after every TRAINER_SHADOW_FULL_EVERY published updates since the
  last full training or shadow, a shadow full retrain on the same data as the newest update
  measures the chain's drift (recorded on the update's model_versions row) and replaces it when
  the update is more than TRAINER_DRIFT_BOUND below it;
* after a rollback (the consistency service made an earlier version current again and marked
  the one it replaced 'rolled_back'), updates are held until a threshold's worth of interactions
  arrived after the data the rolled-back version was trained on (its lsn_to): the next version
  is then trained from the restored one on data the rolled-back version never saw, instead of
  re-learning it at once (VersionStore.rollback_hold_lsn);
* with TRAINER_PUBLISH_AS=canary, every gated candidate (update, full or shadow retrain) after the
  first version goes to `model/canary`; while a canary is undecided the loop trains nothing (a
  candidate could not be published: an undecided canary is never replaced, see runs.py) and says
  so in Status (`held`). Each iteration records decided canaries (`TrainerCore.settle_canaries`):
  after a promotion the next update warm-starts from the promoted version; after an abort,
  updates are held like after a rollback, until a threshold's worth of interactions arrived after
  the data the aborted canary was trained on.
"""
from __future__ import annotations

import logging
import threading
import time

from services.trainer.runs import TrainerCore
from services.trainer.stream_recorder import StreamRecorder

log = logging.getLogger(__name__)


class TrainingLoop:
    def __init__(self, core: TrainerCore, *, enabled: bool, interval_s: float, min_interactions: int,
                 full_retrain_growth: float = 0.0, min_text_coverage: float = 0.0,
                 recorder: StreamRecorder | None = None, first_epochs: int = 0, shadow_full_every: int = 0) -> None:
        self.core, self.enabled, self.interval_s, self.min_interactions = core, enabled, interval_s, min_interactions
        self.full_retrain_growth, self.min_text_coverage = full_retrain_growth, min_text_coverage
        self.first_epochs, self.shadow_full_every = first_epochs, shadow_full_every
        self.recorder = recorder
        self._said_waiting = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._recover = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainer-loop", daemon=True)
        self._attempted_at_pending: int | None = None
        self._attempted_for_version: int | None = None

    def start(self) -> "TrainingLoop":
        self._thread.start()
        return self

    def progress_problem(self) -> str | None:
        """A readiness check: the loop thread must live until stopped."""
        return None if self._thread.is_alive() or self._stop.is_set() else "training loop ended"

    def elected(self) -> None:
        """Called on election: record the delta stream, recover first, then resume the strategy."""
        if self.recorder is not None:
            self.recorder.start()
        self._recover.set()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not self.core.is_leader():
                continue
            try:
                if self._recover.is_set():
                    self._recover.clear()
                    for outcome in self.core.recover():
                        log.info("recovered run", extra={"version": outcome.version.version if outcome.version else 0,
                                                         "published": outcome.published, "reason": outcome.reason})
                # etcd lost model/current (data loss) but model_versions knows what was
                # published: publish it again, loop or no loop, before any new training.
                if self.core.publisher.current().raw is None and self.core.restore_current() is not None:
                    continue
                for version, status in self.core.settle_canaries():
                    log.info("loop: canary decided", extra={"version": version, "status": status})
                if self.enabled:
                    self.tick()
            except Exception as error:  # noqa: BLE001 - keep looping; the next tick retries
                log.warning("training loop iteration failed", extra={"error": f"{type(error).__name__}: {error}"[:300]})

    def tick(self) -> None:
        core = self.core
        current = core.publisher.current()
        recorded = core.log.high_water()
        if current.pointer is None:
            total = core.log.count(0, recorded)
            if total < self.min_interactions:
                return
            if self.recorder is not None and self.recorder.active and not self.recorder.caught_up():
                self._waiting("the delta stream to catch up", recorded=total)
                return
            covered, active = core.catalog.text_coverage()
            if active and covered < self.min_text_coverage * active:
                self._waiting("the feature store's text vectors", covered=covered, active_items=active)
                return
            quick = 0 < self.first_epochs < core.config.epochs
            log.info("loop: first full training", extra={"interactions": total, "quick": quick})
            core.train(epochs=self.first_epochs if quick else 0, publish=True)
            return
        core.held = ""
        if core.config.publish_as == "canary":
            canary = core.publisher.canary()
            if canary.pointer is not None and canary.pointer.share > 0:
                core.held = f"waiting for the decision on canary version {canary.pointer.version}"
                self._said("loop: training held while a canary is undecided", canary_version=canary.pointer.version)
                return
        if self._after_quick_first():
            return
        if self.full_retrain_growth > 0 and self._full_retrain_due(recorded):
            return
        if self._shadow_due(current.version):
            return
        threshold = max(1, core.config.threshold_events)
        held_until = core.versions.rollback_hold_lsn(current.version)
        if held_until > current.data_lsn and core.log.count(held_until, recorded) < threshold:
            core.held = (f"updates held until {threshold} interactions arrived after LSN {held_until} (a version "
                         f"rolled back to, or a canary aborted from, version {current.version} learned up to it)")
            self._waiting_after_rollback(current.version, held_until)
            return
        pending = core.log.count(current.data_lsn, recorded)
        if pending < threshold:
            return
        if (self._attempted_for_version == current.version and self._attempted_at_pending is not None
                and pending - self._attempted_at_pending < threshold):
            return
        log.info("loop: incremental update", extra={"pending": pending, "parent": current.version})
        outcome = core.update(core.default_strategy(), publish=True)
        if outcome.published:
            self._attempted_at_pending = self._attempted_for_version = None
        else:
            self._attempted_at_pending, self._attempted_for_version = pending, current.version
        if outcome.drift_exceeded:
            log.info("loop: the chain of updates crossed the cumulative bound; full retraining",
                     extra={"parent": current.version})
            core.train(publish=True)

    def _after_quick_first(self) -> bool:
        """The full training after the quick first model (True if it ran): due while every full
        training so far ran fewer epochs than TRAINER_MODEL_EPOCHS."""
        core = self.core
        if not (0 < self.first_epochs < core.config.epochs):
            return False
        fulls = [v for v in core.versions.list(500) if v.strategy == "full" and v.status != "candidate"]
        if not fulls or any(int(v.parameters.get("epochs") or 0) >= core.config.epochs for v in fulls):
            return False
        log.info("loop: the full training after the quick first model", extra={"quick_version": fulls[0].version})
        core.train(publish=True)
        return True

    def _shadow_due(self, current_version: int) -> bool:
        """A shadow full retrain of the current version, when it is the N-th published update since
        the last full training or shadow (True if it ran)."""
        if self.shadow_full_every <= 0:
            return False
        updates = 0
        for row in self.core.versions.list(500):
            if row.full_version or (row.kind == "full" and row.status == "published"):
                break
            if row.kind == "update" and row.status == "published":
                updates += 1
        head = self.core.versions.get(current_version)
        if updates < self.shadow_full_every or head is None or head.kind != "update" or head.full_version:
            return False
        log.info("loop: shadow full retrain to measure drift", extra={"of_version": current_version,
                                                                       "updates_since_full": updates})
        self.core.train(publish=True, shadow_of=current_version)
        return True


    def _waiting_after_rollback(self, version: int, held_until: int) -> None:
        if time.monotonic() - self._said_waiting > 30:
            self._said_waiting = time.monotonic()
            log.info("loop: updates held after a rollback until new data arrives",
                     extra={"current_version": version, "after_lsn": held_until})

    def _said(self, message: str, **extra) -> None:
        if time.monotonic() - self._said_waiting > 30:
            self._said_waiting = time.monotonic()
            log.info(message, extra=extra)

    def _waiting(self, what: str, **extra) -> None:
        if time.monotonic() - self._said_waiting > 30:
            self._said_waiting = time.monotonic()
            log.info(f"loop: first training waits for {what}", extra=extra)

    def _full_retrain_due(self, recorded: int) -> bool:
        """Runs a full retraining when the log grew enough since the newest full version (whatever
        became of it: a refused one is not retried before the data grew that much again); True if
        it ran."""
        core = self.core
        last_full = next((v for v in core.versions.list(500) if v.strategy == "full" and v.interactions), None)
        if last_full is None:
            return False
        total = core.log.count(0, recorded)
        if total < last_full.interactions * self.full_retrain_growth:
            return False
        log.info("loop: full retraining", extra={"interactions": total, "last_full": last_full.version})
        core.train(publish=True)
        return True
