"""The trainer's core: full trainings, incremental updates, the gate, publishing, crash recovery.

Plain Python between the gRPC edge (server.py), the background loop (scheduler.py) and storage
(interaction log, model_versions/trainer_runs, artifact store, etcd). One run at a time per
process (a lock), and only while this process holds the leader lease.

A run, step by step (each step durable before the next):
1. read etcd `model/current` (the parent for an update, the gate's baseline for both kinds) and
   the interaction log's high-water mark (the run's lsn_to);
2. allocate the version: model_versions 'candidate' + trainer_runs 'training' (versions.py);
3. train (run_steps.py) on the interactions up to lsn_to, evaluate candidate and current on the
   held-out slice, decide (gate.py);
4. write the artifact (content-addressed, sha256) and record metrics, sha256, URI and the
   decision: phase 'trained' (or 'done' + status 'rejected' when the gate refused);
5. CAS `model/current` from the value read in step 1; record 'published', or 'rejected' with
   the lost race. With TRAINER_PUBLISH_AS=canary (and a model/current to compare with) step 5
   puts `model/canary` instead, in a transaction that also compares `model/current`
   (publisher.py); the version stays 'candidate' with `published_as` 'canary' until its
   decision, which `settle_canaries` records ('published' once promoted, 'rejected' once
   aborted). While a canary is undecided, a gated candidate is kept, not published (status
   'candidate', the decision says which canary it waits behind): an experiment in flight is
   never thrown away by the next update.

Recovery (`recover`, run by a new leader before anything else) looks at every run not 'done':
already in etcd -> recorded as published (nothing written again); 'trained' -> step 5 (the CAS
refuses if etcd moved on); 'training' -> redone under the SAME version number from the stored
request (same interactions, seed and data time, so the same selection), as long as etcd still
holds its baseline, else abandoned. A version is therefore published at most once, and a lost
race is never overwritten.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import sqlalchemy as sa
import torch

from services.common.artifacts import read_verified
from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from services.trainer import gate, run_steps, strategies
from services.model.artifact import ModelArtifact, deserialize
from services.trainer.catalog import Catalog
from services.trainer.config import TrainerConfig
from services.trainer.interaction_log import InteractionLog
from services.trainer.publisher import Current, Publisher
from services.trainer.strategies import Strategy
from services.trainer.training import resolve_device
from services.trainer.versions import (CANDIDATE, PUBLISHED, REJECTED, Fenced, Run, VersionRow, VersionStore)

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


@dataclass
class Outcome:
    version: VersionRow | None
    published: bool = False
    skipped: bool = False
    reason: str = ""
    drift_exceeded: bool = False      # refused on the cumulative bound: the loop retrains from scratch
    canary: bool = False              # published to model/canary (not model/current)


@dataclass
class Progress:
    version: int
    kind: str
    phase: str = "loading"
    epoch: int = 0
    epochs: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Inputs:
    """A run's data, prepared once (fresh runs prepare before allocating, to skip cheaply)."""
    prepared: run_steps.Prepared
    parent: ModelArtifact | None
    examples: list = field(default_factory=list)
    selection: strategies.Selection | None = None
    selection_as_of: float = 0.0


class RunHooks:
    """Where a run can be watched or interfered with from outside the core; the production
    trainer runs with these no-ops. The failure drills of the tests (tests/trainer_drills.py)
    install hooks that hang at a point (to kill -9 the process there) or damage the candidate."""

    POINTS = ("training", "artifact_written", "published_etcd")

    def at(self, point: str, version: int) -> None:
        """The run of `version` reached `point` (one of POINTS; the step before it is durable)."""

    def candidate_trained(self, model, version: int) -> None:
        """The candidate of `version` was trained and is about to be evaluated by the gate."""


class RunCancelled(Exception):
    """The caller of a synchronous Train/Update went away; the run stopped at an epoch boundary."""


class TrainerCore:
    def __init__(self, config: TrainerConfig, engine, publisher: Publisher, trainer_id: str,
                 is_leader: Callable[[], bool] = lambda: True, leader_id: Callable[[], str] = lambda: "",
                 hooks: RunHooks | None = None) -> None:
        self.config, self.engine, self.publisher, self.trainer_id = config, engine, publisher, trainer_id
        self.hooks = hooks or RunHooks()
        self.is_leader, self.leader_id = is_leader, leader_id
        self.log = InteractionLog(engine)
        self.versions = VersionStore(engine)
        self.catalog = Catalog(engine, config.text_fallback)
        self.job_lock = threading.Lock()
        self.progress: Progress | None = None
        self._cancelled: Callable[[], bool] | None = None   # the running job's caller went away
        self.last_update: float | None = None   # wall clock of the last finished run
        self._artifacts: dict[str, ModelArtifact] = {}
        self.on_version: Callable[[VersionRow, bool], None] | None = None
        self.show_progress = False              # per-epoch progress bars on stderr (the CLI)
        self.device = resolve_device(config.device)
        self.held = ""                          # why the loop is not training (set by scheduler.py)

    # ------------------------------------------------------------------------------ public
    def default_strategy(self) -> Strategy:
        c = self.config
        return Strategy(c.window_seconds, c.threshold_events, c.priority, c.top_share, c.replay_ratio)

    def train(self, seed: int = 0, epochs: int = 0, publish: bool = False, *, shadow_of: int = 0,
              cancelled: Callable[[], bool] | None = None, wait_s: float | None = None) -> Outcome:
        """Full training on every recorded interaction. With `shadow_of`, a shadow full retrain of
        that incremental version: on the same data (its lsn_to) and slice, compared with it; published
        only when the version is more than TRAINER_DRIFT_BOUND below it (see scheduler.py).
        `cancelled` (the caller went away) is asked at each epoch: when true the run stops and is
        recorded rejected. `wait_s`: how long to wait for a running job (None: as long as it
        takes), else ABORTED."""
        with self._job("full", cancelled, wait_s):
            current = self.publisher.current()
            lsn_to, holdout_after = self.log.high_water(), current.data_lsn if current.pointer else None
            if shadow_of:
                shadowed = self.get_version(shadow_of)
                if shadowed.kind != "update":
                    raise InvalidArgument(f"shadow_of: version {shadow_of} is not an incremental update")
                lsn_to, holdout_after = shadowed.lsn_to, shadowed.lsn_from
            elif current.pointer and self.log.count(current.data_lsn, lsn_to) == 0:
                # nothing arrived after the current version: judged on the slice it was judged on
                holdout_after = self.versions.run_request(current.version).get("holdout_after_lsn")
            if self.log.count(0, lsn_to) == 0:
                raise FailedPrecondition("no interactions recorded yet: nothing to train on")
            seed = seed or self.config.seed
            epochs = epochs or self.config.epochs
            request = {"seed": seed, "epochs": epochs, "holdout_after_lsn": holdout_after}  # None: every user
            if shadow_of:
                request["shadow_of"] = shadow_of
            inputs = self._inputs("full", lsn_to, parent=None, parent_lsn=0, request=request)
            request["as_of"] = self._as_of(inputs.prepared)
            parameters = {name: value for name, value in request.items() if name != "holdout_events"}
            request["publish_as"] = self._publish_target(current)
            request["holdout_events"] = run_steps.held_out_events(inputs.prepared)
            run = self.versions.allocate(
                kind="full", parent_version=0, strategy="full", parameters=parameters, lsn_from=0,
                lsn_to=lsn_to, request=request, publish=publish, baseline_version=current.version,
                baseline_value=current.raw, holder=self.trainer_id)
            return self._execute(run, inputs)

    def update(self, strategy: Strategy | None = None, publish: bool = False, seed: int = 0,
               cancelled: Callable[[], bool] | None = None, wait_s: float | None = None) -> Outcome:
        """Incremental update from the current version with `strategy` (default: configured)."""
        strategy = (strategy or self.default_strategy())
        try:
            strategy.validate()
        except ValueError as error:
            raise InvalidArgument(f"strategy.{error}") from None
        with self._job("update", cancelled, wait_s):
            current = self.publisher.current()
            if current.pointer is None:
                raise FailedPrecondition("no current model version to update: run Train first")
            lsn_to = self.log.high_water()
            pending = self.log.count(current.data_lsn, lsn_to)
            if pending == 0 or pending < strategy.threshold_events:
                reason = ("no new interactions since the current version" if pending == 0 else
                          f"{pending} new interactions, below the threshold of {strategy.threshold_events}")
                return Outcome(None, skipped=True, reason=reason)
            if self.versions.get(current.version) is None:
                raise FailedPrecondition(f"model/current names version {current.version}, which this database "
                                         f"does not know (another deployment's etcd prefix?): run Train")
            parent = self._load_current(current)
            seed = seed or self.config.seed
            request = {"seed": seed, "epochs": self.config.incremental_epochs, "strategy": strategy.to_dict(),
                       "holdout_after_lsn": current.data_lsn, "retrain_from": current.version}
            inputs = self._inputs("update", lsn_to, parent=parent, parent_lsn=current.data_lsn, request=request)
            if inputs.selection.skipped:
                return Outcome(None, skipped=True, reason=inputs.selection.reason)
            request["as_of"] = inputs.selection_as_of
            request["holdout_events"] = run_steps.held_out_events(inputs.prepared)
            request["publish_as"] = self._publish_target(current)
            run = self.versions.allocate(
                kind="update", parent_version=current.version, strategy=strategy.name,
                parameters={**strategy.to_dict(), "seed": seed}, lsn_from=current.data_lsn, lsn_to=lsn_to,
                request=request, publish=publish, baseline_version=current.version, baseline_value=current.raw,
                holder=self.trainer_id)
            return self._execute(run, inputs)

    def _publish_target(self, current: Current) -> str:
        """Where this run publishes (recorded with the run, so that recovery publishes to the same
        key): the canary when so configured and there is a current version to compare it with."""
        return "canary" if self.config.publish_as == "canary" and current.pointer is not None else "current"

    def settle_canaries(self) -> list[tuple[int, str]]:
        """Records the outcome of canaries a decider (or an operator) has decided: a canary that is
        `model/current` now was promoted ('published'); one gone from `model/canary` and not current
        was aborted ('rejected'); the decider's recorded decision (canary_decision) wins when there
        is one. Reads model/canary before model/current: a promotion moves the version from the
        first to the second in one transaction, so it is never seen in neither. Returns
        (version, status) of what it recorded."""
        settled = []
        for row in self.versions.canaries_in_flight():
            canary = self.publisher.canary()
            if canary.pointer is not None and canary.pointer.version == row.version and not row.canary_decision:
                continue                                   # still in flight
            current = self.publisher.current()
            if row.canary_decision == "promote" or current.version == row.version:
                status, note = PUBLISHED, f"canary promoted to model/current ({row.canary_decision or 'by etcd'})"
            elif canary.pointer is not None and canary.pointer.version == row.version:
                continue                                   # decided but the write has not landed: next look
            else:
                status = REJECTED
                note = ("canary aborted by the decider" if row.canary_decision == "abort"
                        else "canary removed from model/canary without being promoted")
            if self.versions.settle_canary(row.version, status, note):
                log.info("canary settled", extra={"version": row.version, "status": status, "note": note})
                settled.append((row.version, status))
        return settled

    def restore_current(self) -> VersionRow | None:
        """etcd lost `model/current` (its data was lost, or a new cluster) while `model_versions`
        says a version was published: publish that version again — the newest published one,
        its artifact verified first — by compare-and-swap on the key's absence, so that rankers
        keep serving it instead of waiting for a new training. Returns it, or None.

        Which version was current: the newest published one, unless a rollback happened after
        it was published (the newest rollback is from a version at least as new): then the
        version rolled back to."""
        with self.engine.connect() as connection:
            newest = connection.execute(sa.text(
                "SELECT max(version) FROM model_versions WHERE status = 'published'")).scalar()
            rollback = connection.execute(sa.text(
                "SELECT version, rolled_back_to FROM model_versions WHERE status = 'rolled_back' "
                "AND rolled_back_to IS NOT NULL ORDER BY rolled_back_at DESC LIMIT 1")).first()
        if rollback is not None and (newest is None or newest <= rollback[0]):
            newest = rollback[1]
        published = self.versions.get(int(newest)) if newest else None
        if published is None or not published.sha256 or not published.artifact_uri:
            return None
        read_verified(published.artifact_uri, published.sha256, self.engine)
        result = self.publisher.publish(version=published.version, uri=published.artifact_uri,
                                        sha256=published.sha256, data_lsn=published.lsn_to,
                                        metrics=published.metrics or {}, expected=None)
        if not result.published:
            return None
        log.warning("model/current was missing from etcd: restored from model_versions",
                    extra={"version": published.version, "data_lsn": published.lsn_to})
        return published

    def recover(self) -> list[Outcome]:
        """Finishes or abandons the runs a crash left open (see the module docstring)."""
        outcomes = []
        with self._job():
            for run in self.versions.open_runs():
                try:
                    outcomes.append(self._recover_run(run))
                except Fenced as error:
                    log.warning("recovery skipped a run taken over elsewhere", extra={"error": str(error)})
        return outcomes

    def status(self) -> dict:
        current = self.publisher.current()
        canary = self.publisher.canary()
        recorded = self.log.high_water()
        return {"leader": self.is_leader(), "leader_id": self.leader_id() or "", "current_version": current.version,
                "canary_version": canary.pointer.version if canary.pointer and canary.pointer.share > 0 else 0,
                "held": self.held,
                "recorded_lsn": recorded, "pending": self.log.count(current.data_lsn, recorded) if current.pointer else
                self.log.count(0, recorded), "busy": self.progress is not None, "progress": self.progress,
                "last_update": self.last_update, "latest_version": self.versions.latest_version()}

    def get_version(self, version: int) -> VersionRow:
        row = self.versions.get(version)
        if row is None:
            raise NotFound(f"version {version} does not exist")
        return row

    # ------------------------------------------------------------------------------ runs
    @contextlib.contextmanager
    def _job(self, kind: str = "", cancelled: Callable[[], bool] | None = None, wait_s: float | None = None):
        self._require_leader()
        # A request waits for a running job only as long as its caller does (its deadline):
        # one long training must not pile up handler threads that nobody waits for any more.
        if not self.job_lock.acquire(timeout=-1 if wait_s is None else max(wait_s, 0.0)):
            running = self.progress
            raise Aborted("busy: a training is running"
                          + (f" (version {running.version}, {running.kind})" if running else "")
                          + "; retry later")
        try:
            self._require_leader()      # a run waited for may outlive the lease it was asked under
            self.progress = Progress(0, kind) if kind else None
            self._cancelled = cancelled
            try:
                yield
            finally:
                self.progress = None
                self._cancelled = None
        finally:
            self.job_lock.release()

    def _require_leader(self) -> None:
        if not self.is_leader():
            leader = self.leader_id()
            raise FailedPrecondition("this trainer is a standby; only the leader trains"
                                     + (f" (leader: {leader})" if leader else ""))

    def _phase(self, phase: str, **values) -> None:
        if self.progress is not None:
            self.progress.phase = phase
            for name, value in values.items():
                setattr(self.progress, name, value)
        log.info("run phase", extra={"phase": phase, "version": self.progress.version if self.progress else 0})

    def _as_of(self, prepared: run_steps.Prepared) -> float:
        return max((i.occurred_at for i in prepared.interactions), default=0.0)

    def _inputs(self, kind: str, lsn_to: int, *, parent: ModelArtifact | None, parent_lsn: int,
                request: dict) -> "_Inputs":
        interactions = self.log.load(lsn_to)
        catalog_items, _ = self.catalog.items()
        prepared = run_steps.prepare(interactions, item_prefix=parent.item_ids if parent else (),
                                    catalog_items=catalog_items, eval_users=self.config.eval_users,
                                    holdout_after_lsn=request.get("holdout_after_lsn"))
        run_steps.set_item_text(prepared, self.catalog.vectors(prepared.data.item_ids.external_ids()))
        inputs = _Inputs(prepared, parent)
        if kind == "update":
            strategy = Strategy.from_dict(request["strategy"])
            as_of = request.get("as_of") or self._as_of(prepared)
            # test-then-train: the parent's held-out slice is new data for its child
            retrain = self.versions.held_out_events(int(request.get("retrain_from", 0)))
            new, old_counts = run_steps.new_interactions(prepared, parent_lsn, retrain)
            inputs.selection = strategies.select(new, strategy, as_of, old_counts)
            inputs.selection_as_of = as_of
            inputs.examples = run_steps.examples_of(inputs.selection.selected)
        return inputs

    def _execute(self, run: Run, inputs: "_Inputs | None" = None) -> Outcome:
        self.progress = Progress(run.version, run.kind)
        log.info("run started", extra={"version": run.version, "kind": run.kind, "attempt": run.attempt,
                                       "lsn_to": run.lsn_to})
        try:
            return self._train_gate_store_publish(run, inputs)
        except Fenced as error:
            log.warning("run taken over by another trainer; stopping", extra={"error": str(error)})
            return Outcome(self.versions.get(run.version), reason=str(error))
        except Exception as error:
            # A run that failed (or whose caller went away) is decided now, not left a candidate
            # "training" until the next election's recovery.
            reason = ("cancelled: the caller went away" if isinstance(error, RunCancelled)
                      else f"failed: {type(error).__name__}")
            try:
                self.versions.finish(run, REJECTED, reason)
            except Exception:  # noqa: BLE001 - store down: recovery decides the run later
                log.warning("could not record the failed run", extra={"version": run.version})
            log.warning("run ended without a model", extra={"version": run.version, "reason": reason})
            raise

    def _train_gate_store_publish(self, run: Run, inputs: "_Inputs | None") -> Outcome:
        self.hooks.at("training", run.version)
        request = run.request
        if inputs is None:
            parent = self._load_version(run.parent_version) if run.kind == "update" else None
            inputs = self._inputs(run.kind, run.lsn_to, parent=parent, parent_lsn=run.lsn_from, request=request)
        prepared = inputs.prepared
        shadow_of = int(request.get("shadow_of", 0))
        started = time.perf_counter()
        seed = int(request.get("seed", self.config.seed))
        self._phase("training", epochs=int(request.get("epochs") or 0))
        model, stats, extra = self._train(run, inputs, seed)
        train_seconds = time.perf_counter() - started
        self.hooks.candidate_trained(model, run.version)

        self._phase("evaluating", epoch=stats.epochs_run)
        decision, anchor_version = self._gate(run, model, prepared)

        self._phase("storing")
        catalog_items, active = self.catalog.items()
        active_ids = active if catalog_items else prepared.data.item_ids.external_ids()
        vector_ids, vectors = run_steps.item_vector_table(model, prepared, active_ids)
        artifact = ModelArtifact(
            version=run.version, config=model.config,
            state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
            item_ids=prepared.data.item_ids.external_ids(), item_vector_ids=vector_ids, item_vectors=vectors,
            data_lsn=run.lsn_to, parent_version=run.parent_version,
            popular_item_ids=run_steps.popular_items(prepared.interactions, 100, set(active_ids)))
        uri, sha = self.publisher.store_artifact(artifact)
        self._remember(sha, artifact)
        self.versions.record_trained(
            run, metrics=decision.candidate, baseline_metrics=decision.baseline, train_seconds=train_seconds,
            sha256=sha, artifact_uri=uri, interactions=len(prepared.interactions), items=prepared.num_items,
            decision=decision.reason, parameters={**extra, "epochs_run": stats.epochs_run} if extra
            else {"epochs_run": stats.epochs_run}, rejected=not decision.passed, anchor_version=anchor_version,
            anchor_metrics=decision.anchor, evidence=decision.evidence, shadow_of=shadow_of)
        if shadow_of:
            self.versions.record_full_comparison(shadow_of, run.version, decision.candidate, train_seconds)
        log.info("run trained", extra={"version": run.version, "metrics": decision.candidate,
                                       "baseline": decision.baseline, "anchor": decision.anchor,
                                       "evidence": decision.evidence, "passed": decision.passed,
                                       "train_seconds": round(train_seconds, 2), "sha256": sha})
        self.hooks.at("artifact_written", run.version)
        if not decision.passed:
            return self._done(run, False, decision.reason, drift_exceeded=decision.drift_exceeded)
        if decision.hold:
            self.versions.finish(run, CANDIDATE, decision.reason)
            return self._done(run, False, decision.reason)
        if not run.publish:
            self.versions.finish(run, CANDIDATE, decision.reason + "; not published (publish=false)")
            return self._done(run, False, "not published (publish=false)")
        return self._publish(run, uri, sha, decision.candidate, decision.reason)

    def _train(self, run: Run, inputs: "_Inputs", seed: int):
        """The run's model (full: from scratch; update: warm start from the parent, in place)."""
        prepared, request = inputs.prepared, run.request
        extra: dict = {}
        if run.kind == "full":
            model, stats = run_steps.run_full(prepared, self.config.model_config(), seed=seed,
                                             epochs=int(request.get("epochs") or self.config.epochs),
                                             progress=self.show_progress, on_epoch=self._epoch_progress,
                                             device=self.device)
        else:
            parent = inputs.parent
            model = run_steps.remap_items(parent.build_model(), parent.item_ids, prepared.data.item_ids)
            model.config = dataclasses.replace(
                model.config, incremental_epochs=self.config.incremental_epochs,
                incremental_learning_rate=self.config.incremental_learning_rate,
                batch_size=self.config.batch_size, num_negatives=self.config.num_negatives)
            strategy = Strategy.from_dict(request["strategy"])
            stats = run_steps.run_incremental(model, prepared, inputs.examples, strategy.replay_ratio, seed=seed,
                                             epochs=int(request.get("epochs") or self.config.incremental_epochs),
                                             progress=self.show_progress, on_epoch=self._epoch_progress,
                                             device=self.device, policy=self.config.incremental_policy())
            extra = {**inputs.selection.summary(), "examples": len(inputs.examples),
                     "replay_examples": stats.replay_examples,
                     "new_items": len(prepared.data.item_ids) - len(parent.item_ids)}
        return model, stats, extra

    def _epoch_progress(self, done: int, epochs: int) -> None:
        """training.py's progress callback: the epoch counts that Status shows while training;
        also where a run whose caller went away (a synchronous Train/Update) stops."""
        if self.progress is not None:
            self.progress.epoch, self.progress.epochs = done, epochs
        cancelled = getattr(self, "_cancelled", None)
        if cancelled is not None and done < epochs and cancelled():
            raise RunCancelled(f"cancelled after epoch {done} of {epochs}")

    def _publish(self, run: Run, uri: str, sha: str, metrics: dict, gate_reason: str) -> Outcome:
        self._phase("publishing")
        if not self.is_leader():
            self.versions.set_decision(run, gate_reason + "; waiting: leadership lost before publishing")
            return Outcome(self.versions.get(run.version), reason="leadership lost before publishing")
        if run.request.get("publish_as") == "canary":
            return self._publish_canary(run, uri, sha, metrics, gate_reason)
        result = self.publisher.publish(version=run.version, uri=uri, sha256=sha, data_lsn=run.lsn_to,
                                        metrics=metrics, expected=run.baseline_value)
        self.hooks.at("published_etcd", run.version)
        if result.published:
            pointer = result.current.pointer
            self.versions.finish(run, PUBLISHED, f"{gate_reason}; {result.reason}",
                                 sha256=pointer.sha256 if pointer else sha, artifact_uri=pointer.uri if pointer else uri,
                                 published_as="current")
            return self._done(run, True, result.reason)
        self.versions.finish(run, REJECTED, result.reason)
        return self._done(run, False, result.reason)

    def _publish_canary(self, run: Run, uri: str, sha: str, metrics: dict, gate_reason: str) -> Outcome:
        share = self.config.canary_share
        result = self.publisher.publish_canary(version=run.version, uri=uri, sha256=sha, data_lsn=run.lsn_to,
                                               metrics=metrics, share=share, expected_current=run.baseline_value)
        self.hooks.at("published_etcd", run.version)
        if result.published:
            pointer = result.current.pointer
            self.versions.finish(run, CANDIDATE, f"{gate_reason}; {result.reason}; awaiting the canary decision",
                                 published_as="canary", canary_share=pointer.share if pointer else share)
            return self._done(run, True, result.reason, canary=True)
        if result.canary_busy:
            # Gated and kept: a candidate with its artifact, not published (see the module docstring).
            reason = f"{gate_reason}; {result.reason}"
            self.versions.finish(run, CANDIDATE, reason)
            return self._done(run, False, result.reason)
        self.versions.finish(run, REJECTED, result.reason)
        return self._done(run, False, result.reason)

    def _done(self, run: Run, published: bool, reason: str, drift_exceeded: bool = False,
              canary: bool = False) -> Outcome:
        self.last_update = time.time()
        row = self.versions.get(run.version)
        if self.on_version is not None and row is not None:
            try:
                self.on_version(row, published)
            except Exception:  # noqa: BLE001 - reporting must not fail a run
                log.exception("on_version hook failed")
        return Outcome(row, published=published, reason=reason, drift_exceeded=drift_exceeded, canary=canary)

    def _gate(self, run: Run, model, prepared: run_steps.Prepared) -> tuple[gate.GateDecision, int]:
        """The gate's decision for the run's candidate, and the anchor version it was bounded by (0: none).

        * update: against the current version (per step) and the newest published full training
          (cumulative), unless that is the current version itself;
        * shadow full retrain: against the incremental version it shadows, on its slice, with the drift
          bound as the rule the other way round: published only if the update fell more than
          TRAINER_DRIFT_BOUND below it (then the full model replaces the drifted chain);
        * full training: against the current version."""
        c = self.config
        shadow_of = int(run.request.get("shadow_of", 0))
        if shadow_of:
            shadowed = self._version_model(shadow_of, prepared)
            decision = gate.evaluate_pair(model, shadowed, prepared, c.gate_metric, c.gate_tolerance, c.gate_z,
                                          min_users=c.gate_min_users)
            return gate.shadow_decision(decision, c.gate_metric, c.drift_bound, shadow_of), 0
        baseline_model = self._baseline_model(run, prepared)
        anchor, anchor_version = None, 0
        if run.kind == "update" and baseline_model is not None:
            newest_full = self.versions.newest_published_full()
            if newest_full is not None and newest_full.version != run.baseline_version:
                anchor, anchor_version = self._version_model(newest_full.version, prepared), newest_full.version
        decision = gate.evaluate_pair(model, baseline_model, prepared, c.gate_metric, c.gate_tolerance, c.gate_z,
                                      anchor=anchor, cumulative_tolerance=c.gate_cumulative_tolerance,
                                      min_users=c.gate_min_users)
        return decision, anchor_version if decision.anchor is not None else 0

    def _recover_run(self, run: Run) -> Outcome:
        current = self.publisher.current()
        if current.version == run.version:
            run = self.versions.take_over(run, self.trainer_id)
            pointer = current.pointer
            self.versions.finish(run, PUBLISHED, "published before a restart; recorded by recovery",
                                 sha256=pointer.sha256, artifact_uri=pointer.uri,
                                 published_as=run.request.get("publish_as") or "current")
            log.info("recovery: run was already published", extra={"version": run.version})
            return self._done(run, True, "already published")
        canary = self.publisher.canary()
        if canary.pointer is not None and canary.pointer.version == run.version:
            run = self.versions.take_over(run, self.trainer_id)
            self.versions.finish(run, CANDIDATE, "published as model/canary before a restart; recorded by recovery; "
                                 "awaiting the canary decision", published_as="canary",
                                 canary_share=canary.pointer.share)
            log.info("recovery: run was already the canary", extra={"version": run.version})
            return self._done(run, True, "already the canary", canary=True)
        row = self.versions.get(run.version)
        if run.phase == "trained":
            run = self.versions.take_over(run, self.trainer_id)
            if not run.publish:
                self.versions.finish(run, CANDIDATE, row.decision + "; not published (publish=false)")
                return self._done(run, False, "record only")
            log.info("recovery: publishing a trained run", extra={"version": run.version})
            self.progress = Progress(run.version, run.kind, "publishing")
            return self._publish(run, row.artifact_uri, row.sha256, row.metrics, row.decision)
        # interrupted while training
        run = self.versions.take_over(run, self.trainer_id)
        if not run.publish:
            reason = "abandoned: interrupted while training (record-only run)"
        elif run.attempt > MAX_ATTEMPTS:
            reason = f"abandoned: interrupted {run.attempt - 1} times"
        elif current.raw != run.baseline_value:
            reason = (f"abandoned: interrupted while training, and model/current moved on to version "
                      f"{current.version} meanwhile")
        else:
            log.info("recovery: redoing an interrupted run", extra={"version": run.version, "attempt": run.attempt})
            return self._execute(run)
        self.versions.finish(run, REJECTED, reason)
        log.info("recovery: run abandoned", extra={"version": run.version, "reason": reason})
        return self._done(run, False, reason)

    # ------------------------------------------------------------------------------ models
    def _load_artifact(self, uri: str, sha: str) -> ModelArtifact:
        cached = self._artifacts.get(sha)
        if cached is not None:
            return cached
        artifact = deserialize(read_verified(uri, sha, self.engine))
        self._remember(sha, artifact)
        return artifact

    def _remember(self, sha: str, artifact: ModelArtifact) -> None:
        """Keeps the last three artifacts (the current version, the gate's anchor, the newest candidate)."""
        self._artifacts[sha] = artifact
        while len(self._artifacts) > 3:
            self._artifacts.pop(next(iter(self._artifacts)))

    def _load_current(self, current: Current) -> ModelArtifact:
        try:
            if current.pointer is None:
                raise KeyError("model/current holds no usable pointer")
            return self._load_artifact(current.pointer.uri, current.pointer.sha256)
        except Exception as error:  # noqa: BLE001 - any failure: the current version is unusable
            raise FailedPrecondition(f"cannot load the current version {current.version} "
                                     f"({type(error).__name__}: {str(error)[:200]}); run Train") from None

    def _load_version(self, version: int) -> ModelArtifact:
        row = self.versions.get(version)
        if row is None or not row.artifact_uri:
            raise FailedPrecondition(f"version {version} has no artifact")
        return self._load_artifact(row.artifact_uri, row.sha256)

    def _version_model(self, version: int, prepared: run_steps.Prepared):
        """A recorded version's model in the prepared index space (None: it cannot be loaded)."""
        try:
            artifact = self._load_version(version)
        except Exception as error:  # noqa: BLE001
            log.warning("gate: a version to compare with cannot be loaded", extra={"version": version,
                                                                                 "error": str(error)[:200]})
            return None
        return run_steps.remap_items(artifact.build_model(), artifact.item_ids, prepared.data.item_ids)

    def _baseline_model(self, run: Run, prepared: run_steps.Prepared):
        """The version the run is gated against (etcd's value when the run started), in the
        prepared index space; None when there was none or it cannot be loaded."""
        if not run.baseline_value:
            return None
        try:
            value = json.loads(run.baseline_value)
            artifact = self._load_artifact(value["uri"], value["sha256"])
        except Exception as error:  # noqa: BLE001
            log.warning("gate: the current version cannot be loaded; comparing with nothing",
                        extra={"error": str(error)[:200]})
            return None
        return run_steps.remap_items(artifact.build_model(), artifact.item_ids, prepared.data.item_ids)


def set_torch_threads(threads: int) -> None:
    torch.set_num_threads(max(1, threads))
