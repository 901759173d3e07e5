"""`Check`: every part against the source, at a stated watermark.

Each check adds findings (check, severity, subject, plain-words detail, repairable, keys, LSN
range) to one Report. Data checks compare bucket digests first (services/contracts/digest.py)
and read rows only for the buckets that differ; a key that differs is then read again on both
sides after the consumer has passed the WAL position of the first read (`settle`): a key that
changed meanwhile, or that the consumer has not reached yet, is in flight (lag), and only a key
that stayed wrong although the consumer is past it is drift. So a check never reports as drift
what is only in flight, and says so when it is lag.

Time-based rules (a replica serving another version for longer than the grace period, a slot
without consumer for longer than the threshold, a lasting lag) need to have seen the state
before: `Observations` remembers since when each state has been seen, across checks.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from services.common.artifacts import ArtifactCorrupt, ArtifactMissing, read_verified
from services.common.etcd import Etcd, EtcdUnavailable
from services.common.lsn import format_lsn
from services.consistency import findings as fn
from services.consistency.findings import DigestSummary, Finding, ReplicaState, Report, Severity
from services.consistency.replicas import IndexSnapshot, Registration, ReplicaUnreachable, Replicas
from services.consistency.sources import Row, Sources
from services.contracts import digest as dg
from services.contracts.etcd_keys import COLLECTOR_SLOTS_PREFIX, DATA_WATERMARK, MODEL_CANARY, MODEL_CURRENT
from services.contracts.model_pointer import InvalidPointer, ModelPointer

log = logging.getLogger(__name__)


@dataclass
class CheckSettings:
    version_grace_s: float = 30.0
    settle_s: float = 15.0
    slot_abandoned_s: float = 300.0
    lag_warning_bytes: int = 256 * 1024 * 1024
    lag_warning_s: float = 120.0
    retained_wal_error_bytes: int = 8 * 1024 ** 3
    features_consumer: str = "features"
    trainer_consumer: str = "trainer"

    @classmethod
    def from_config(cls, config) -> "CheckSettings":
        return cls(config.version_grace_s, config.settle_s, config.slot_abandoned_s, config.lag_warning_bytes,
                   config.lag_warning_s, config.retained_wal_error_bytes, config.features_consumer,
                   config.trainer_consumer)


class Observations:
    """Since when (monotonic clock) each observed state has held; forgotten once it stops."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._since: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def seen(self, key: tuple) -> float:
        """Seconds the state `key` has been seen (0 the first time)."""
        now = self.clock()
        with self._lock:
            return now - self._since.setdefault(key, now)

    def keep_only(self, prefix: str, keys: set[tuple]) -> None:
        with self._lock:
            for key in [k for k in self._since if k[0] == prefix and k not in keys]:
                del self._since[key]


@dataclass
class Settled:
    drift: list[str] = field(default_factory=list)
    lag: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)
    reached: bool = True
    target_lsn: int = 0
    applied_lsn: int = 0


def _normal(row: Row | None):
    return None if row is None or row.value == ("inactive",) else row.value


class Checker:
    def __init__(self, sources: Sources, etcd: Etcd, replicas: Replicas, versions_lookup, *,
                 settings: CheckSettings, artifact_engine=None, observations: Observations | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """`versions_lookup(version)` returns the model_versions row (dict) or None."""
        self.sources, self.etcd, self.replicas = sources, etcd, replicas
        self.versions_lookup = versions_lookup
        self.settings = settings
        self.artifact_engine = artifact_engine
        self.observations = observations or Observations()
        self.sleep = sleep
        self.registrations: list[Registration] = []
        self.snapshots: dict[str, tuple] = {}

    # ------------------------------------------------------------------ entry point
    def check(self, checks: tuple[str, ...] | list[str] = ()) -> Report:
        wanted = set(checks or fn.ALL_CHECKS)
        unknown = wanted - set(fn.ALL_CHECKS)
        if unknown:
            from services.common.errors import InvalidArgument
            raise InvalidArgument(f"checks: unknown check {sorted(unknown)[0]!r} "
                                  f"(known: {', '.join(fn.ALL_CHECKS)})")
        started = time.perf_counter()
        report = Report()
        report.watermark = self.sources.applied_lsn(self.settings.features_consumer)
        steps = [(fn.MODEL_VERSION, self.check_model_versions), (fn.ARTIFACT, self.check_artifacts),
                 (fn.CATALOG_FEATURES, self.check_catalog_features),
                 (fn.FEATURES_INDEX, self.check_features_index),
                 (fn.USER_EVENTS, self.check_user_events), (fn.TRAINER_EVENTS, self.check_trainer_events),
                 (fn.REPLICATION, self.check_replication), (fn.WATERMARK, self.check_watermark)]
        self.registrations, self.snapshots = [], {}
        if wanted & {fn.MODEL_VERSION, fn.FEATURES_INDEX}:
            try:
                self.registrations = self.replicas.registrations()
            except EtcdUnavailable as error:
                report.add(Finding(fn.MODEL_VERSION, Severity.ERROR, "etcd",
                                   f"etcd unreachable, replicas not checked: {str(error)[:160]}"))
            # One IndexDigest per replica serves both checks: it is also the liveness probe.
            for registration in self.registrations:
                started = time.perf_counter()
                try:
                    self.snapshots[registration.replica_id] = (self.replicas.index_digest(registration),
                                                               time.perf_counter() - started)
                except ReplicaUnreachable as error:
                    self.snapshots[registration.replica_id] = (error, 0.0)
        for name, step in steps:
            if name not in wanted:
                continue
            try:
                step(report)
            except EtcdUnavailable as error:
                report.add(Finding(name, Severity.ERROR, "etcd", f"etcd unreachable: {str(error)[:200]}"))
        report.seconds = time.perf_counter() - started
        return report

    # ------------------------------------------------------------------ 1. model versions
    def _pointer(self, report: Report, key: str, canary: bool) -> ModelPointer | None:
        kv = self.etcd.get(key)
        if kv is None:
            return None
        try:
            pointer = ModelPointer.from_json(kv.value, canary=canary)
        except InvalidPointer as error:
            # A bad canary is aborted by Reconcile; a bad model/current needs a Rollback.
            report.add(Finding(fn.MODEL_VERSION, Severity.ERROR, key, f"{key} is not a valid model pointer: "
                               f"{error}" + ("" if canary else "; roll back to a good version"),
                               repairable=canary, repair="abort_canary" if canary else ""))
            return None
        return pointer

    def check_model_versions(self, report: Report) -> None:
        current = self._pointer(report, MODEL_CURRENT, False)
        canary = self._pointer(report, MODEL_CANARY, True)
        report.current_version = current.version if current else 0
        report.canary_version = canary.version if canary and canary.share > 0 else 0
        for name, pointer in (("current", current), ("canary", canary)):
            if pointer is None:
                continue
            row = self.versions_lookup(pointer.version)
            if row is None:
                report.add(Finding(fn.MODEL_VERSION, Severity.ERROR, f"model/{name}",
                                   f"model/{name} names version {pointer.version}, unknown to model_versions",
                                   model_version=pointer.version, repairable=name == "canary",
                                   repair="abort_canary" if name == "canary" else ""))
            elif name == "current" and row["status"] == "candidate" and row.get("canary_decision") == "promote":
                # The decider's promotion moved the pointer; the trainer marks the version published
                # on its next look (settle_canaries), so until then this is a note, not drift.
                report.add(Finding(fn.MODEL_VERSION, Severity.OK, "model/current",
                                   f"model/current names version {pointer.version}, a canary promoted by the "
                                   f"decider that the trainer has not yet recorded as published",
                                   model_version=pointer.version))
            elif row["status"] not in ("published",) and name == "current":
                report.add(Finding(fn.MODEL_VERSION, Severity.ERROR, "model/current",
                                   f"model/current names version {pointer.version}, whose status is "
                                   f"{row['status']!r}", model_version=pointer.version))
            elif row.get("sha256") and row["sha256"] != pointer.sha256:
                report.add(Finding(fn.MODEL_VERSION, Severity.ERROR, f"model/{name}",
                                   f"model/{name} says sha256 {pointer.sha256[:12]}… for version "
                                   f"{pointer.version}, model_versions says {row['sha256'][:12]}…",
                                   model_version=pointer.version))
        if canary is not None and current is not None and canary.share > 0 \
                and canary.version == current.version:
            report.add(Finding(fn.MODEL_VERSION, Severity.WARNING, "model/canary",
                               f"the canary is the current version {canary.version}: it tests nothing",
                               model_version=canary.version))
        seen = set()
        for registration in self.registrations:
            state = ReplicaState(registration.replica_id, registration.address, registration.model_version,
                                 str(registration.value.get("model_sha256") or ""),
                                 int(registration.value.get("data_lsn") or 0),
                                 int(registration.value.get("index_size") or 0),
                                 str(registration.value.get("index_checksum") or ""),
                                 int(registration.value.get("canary_version") or 0))
            report.replicas.append(state)
            probe = self.snapshots.get(registration.replica_id, (None, 0.0))[0]
            if isinstance(probe, ReplicaUnreachable):
                self._dead_registration(report, registration, probe)
                continue
            if probe is not None:
                state.answering, state.data_lsn = True, probe.data_lsn
                state.index_digest = probe.digest.root()
            if current is None:
                continue
            if state.model_version == current.version:
                continue
            key = ("version", registration.replica_id, state.model_version, current.version)
            seen.add(key)
            for_s = self.observations.seen(key)
            served = f"v{state.model_version}" if state.model_version else "no model"
            detail = (f"ranker {registration.replica_id} serves {served}, current is v{current.version}, "
                      f"for {for_s:.0f} s")
            refused = registration.value.get("refused_version")
            if refused == current.version:
                reason = str(registration.value.get("refused_reason") or "")[:120]
                detail += f" (it refused v{refused}: {reason})"
            severity = Severity.ERROR if for_s >= self.settings.version_grace_s else Severity.OK
            if severity is Severity.OK:
                detail += f" (within the {self.settings.version_grace_s:.0f} s grace period: swapping)"
            report.add(Finding(fn.MODEL_VERSION, severity, registration.replica_id, detail,
                               repairable=severity is Severity.ERROR, model_version=current.version,
                               repair="reload_model", target=registration.replica_id))
        self.observations.keep_only("version", seen)

    @staticmethod
    def _dead_registration(report: Report, registration: Registration, error) -> None:
        if any(f.repair == "delete_registration" and f.target == registration.replica_id
               for f in report.findings):
            return
        report.add(Finding(fn.MODEL_VERSION, Severity.ERROR, registration.replica_id,
                           f"ranker {registration.replica_id} is registered at "
                           f"{registration.address or '(no address)'} but does not answer ({error}): "
                           f"a dead registration", repairable=True, repair="delete_registration",
                           target=registration.replica_id))

    # ------------------------------------------------------------------ 2. artifacts
    def check_artifacts(self, report: Report) -> None:
        for name, key, canary in (("current", MODEL_CURRENT, False), ("canary", MODEL_CANARY, True)):
            kv = self.etcd.get(key)
            if kv is None:
                continue
            try:
                pointer = ModelPointer.from_json(kv.value, canary=canary)
            except InvalidPointer:
                continue          # reported by the model-version check
            try:
                read_verified(pointer.uri, pointer.sha256, self.artifact_engine)
            except ArtifactMissing:
                detail = f"the {name} artifact of v{pointer.version} is missing: {pointer.uri}"
            except ArtifactCorrupt as error:
                detail = f"the {name} artifact of v{pointer.version} fails verification: {error}"
            except Exception as error:  # noqa: BLE001 - unreadable store: the same outcome for rankers
                detail = (f"the {name} artifact of v{pointer.version} cannot be read: "
                          f"{type(error).__name__}: {error}")
            else:
                report.add(Finding(fn.ARTIFACT, Severity.OK, f"model/{name}",
                                   f"the {name} artifact of v{pointer.version} re-hashed: sha256 matches",
                                   model_version=pointer.version))
                continue
            report.add(Finding(fn.ARTIFACT, Severity.ERROR, f"model/{name}", detail, repairable=True,
                               model_version=pointer.version,
                               repair="rollback_current" if name == "current" else "abort_canary"))

    # ------------------------------------------------------------------ the settle rule
    def settle(self, keys: list[str], read_left: Callable[[list[str]], dict[str, Row]],
               read_right: Callable[[list[str]], dict[str, Row]], consumer: str) -> Settled:
        """Classifies differing keys into drift / lag / in flight (see the module docstring)."""
        result = Settled()
        if not keys:
            return result
        first_left, first_right = read_left(keys), read_right(keys)
        target = self.sources.wal_lsn()
        deadline = time.monotonic() + self.settings.settle_s
        applied = self.sources.applied_lsn(consumer)
        while applied < target and time.monotonic() < deadline:
            self.sleep(0.1)
            applied = self.sources.applied_lsn(consumer)
        result.reached, result.target_lsn, result.applied_lsn = applied >= target, target, applied
        left, right = read_left(keys), read_right(keys)
        for key in keys:
            if _normal(left.get(key)) == _normal(right.get(key)):
                result.in_flight.append(key)
                continue
            moved = any((first.get(key).token if first.get(key) else None)
                        != (second.get(key).token if second.get(key) else None)
                        for first, second in ((first_left, left), (first_right, right)))
            if moved:
                result.in_flight.append(key)
            elif result.reached:
                result.drift.append(key)
            else:
                result.lag.append(key)
        return result

    def _compare(self, report: Report, kind: str, left_side: str, right_side: str,
                 left_digest: Callable[[], dg.Digest], right_digest: Callable[[], dg.Digest],
                 left_rows: Callable[[list[int]], dict[str, Row]],
                 right_rows: Callable[[list[int]], dict[str, Row]]
                 ) -> tuple[list[str], dict[str, Row], dict[str, Row]]:
        """Digests of both sides, then rows of the differing buckets; returns the differing keys."""
        started = time.perf_counter()
        left = left_digest()
        left_s = time.perf_counter() - started
        started = time.perf_counter()
        right = right_digest()
        right_s = time.perf_counter() - started
        differing = left.differing(right)
        started = time.perf_counter()
        l_rows, r_rows = left_rows(differing), right_rows(differing)
        rows_s = time.perf_counter() - started
        keys = sorted(k for k in set(l_rows) | set(r_rows)
                      if _normal(l_rows.get(k)) != _normal(r_rows.get(k)))
        report.digests.append(DigestSummary(kind, left_side, left.rows, len(left.buckets), left.root(),
                                            len(differing), len(l_rows), left_s + rows_s / 2))
        report.digests.append(DigestSummary(kind, right_side, right.rows, len(right.buckets), right.root(),
                                            len(differing), len(r_rows), right_s + rows_s / 2))
        return keys, l_rows, r_rows

    def _lag_finding(self, report: Report, check: str, subject: str, settled: Settled, what: str) -> None:
        if settled.lag:
            report.add(Finding(check, Severity.WARNING, subject,
                               f"{len(settled.lag)} {what} differ but {subject} has not yet applied the WAL "
                               f"up to {format_lsn(settled.target_lsn)} (applied "
                               f"{format_lsn(settled.applied_lsn)}): "
                               f"lag, not drift", keys=settled.lag, lsn_from=settled.applied_lsn,
                               lsn_to=settled.target_lsn))
        if settled.in_flight:
            report.add(Finding(check, Severity.OK, subject,
                               f"{len(settled.in_flight)} {what} were in flight and caught up during "
                               f"the check",
                               keys=settled.in_flight))

    # ------------------------------------------------------------------ 3. catalog vs feature store
    def check_catalog_features(self, report: Report) -> None:
        s = self.sources
        keys, _, _ = self._compare(report, dg.CATALOG_ITEMS, "catalog", "feature_store", s.catalog_digest,
                                   s.feature_items_digest, s.catalog_rows, s.feature_item_rows)
        report.source_root = report.digests[-2].root
        report.feature_store_root = report.digests[-1].root
        settled = self.settle(keys, s.catalog_rows_of, s.feature_item_rows_of,
                              self.settings.features_consumer)
        if settled.drift:
            catalog, store = s.catalog_rows_of(settled.drift), s.feature_item_rows_of(settled.drift)
            missing = [k for k in settled.drift if _normal(store.get(k)) is None]
            stale = [k for k in settled.drift
                     if _normal(store.get(k)) is not None and _normal(catalog.get(k)) is not None]
            extra = [k for k in settled.drift if _normal(catalog.get(k)) is None]
            parts = []
            if missing:
                parts.append(f"{len(missing)} active catalog item(s) have no current embedding in the "
                             f"feature store")
            if stale:
                parts.append(f"{len(stale)} item(s) whose stored content hash is not their text's")
            if extra:
                parts.append(f"{len(extra)} item(s) deleted or inactive in the catalog still active in the "
                             f"feature store")
            report.add(Finding(fn.CATALOG_FEATURES, Severity.ERROR, "item_features", "; ".join(parts),
                               repairable=True, keys=settled.drift, lsn_to=settled.applied_lsn,
                               repair="resync_items"))
        self._lag_finding(report, fn.CATALOG_FEATURES, self.settings.features_consumer, settled, "items")

    # ------------------------------------------------------------------ 4. feature store vs each index
    def check_features_index(self, report: Report) -> None:
        s = self.sources
        started = time.perf_counter()
        expected = s.index_expected_digest()
        report.digests.append(DigestSummary(dg.INDEX_ITEMS, "feature_store", expected.rows,
                                            len(expected.buckets), expected.root(),
                                            seconds=time.perf_counter() - started))
        states = {state.replica_id: state for state in report.replicas}
        # Items the catalog check found wrong in the feature store itself: the rankers mirror
        # the feature store, so those are repaired there (and reach the rankers through
        # WatchItems), not counted against every replica.
        store_drift = {key for f in report.findings if f.check == fn.CATALOG_FEATURES and f.bad
                       for key in f.keys}
        roots_at: dict[int, dict[str, str]] = {}
        drifted: set[str] = set()
        for registration in self.registrations:
            state = states.get(registration.replica_id)
            if state is None:
                state = ReplicaState(registration.replica_id, registration.address)
                report.replicas.append(state)
            snapshot, digest_s = self.snapshots.get(registration.replica_id, (None, 0.0))
            if not isinstance(snapshot, IndexSnapshot):
                self._dead_registration(report, registration, snapshot)
                continue
            started = time.perf_counter() - digest_s
            state.answering, state.data_lsn = True, snapshot.data_lsn
            state.index_digest = snapshot.digest.root()
            roots_at.setdefault(snapshot.data_lsn, {})[registration.replica_id] = state.index_digest
            differing = expected.differing(snapshot.digest)
            detail = self.replicas.entries(registration, differing) if differing else snapshot
            fs_rows = s.index_expected_rows(differing)
            report.digests.append(DigestSummary(dg.INDEX_ITEMS, f"ranker:{registration.replica_id}",
                                                snapshot.digest.rows, len(snapshot.digest.buckets),
                                                state.index_digest, len(differing),
                                                len(detail.entries) + len(fs_rows),
                                                time.perf_counter() - started))
            watermark = min(snapshot.data_lsn, detail.data_lsn)
            lost, stale, kept, lag = [], [], [], []
            for key in sorted(set(fs_rows) | set(detail.entries)):
                if key in store_drift:
                    continue
                fs = fs_rows.get(key)
                want = None if fs is None or fs.value[0] == "absent" else fs.value[0]
                have = detail.entries.get(key)
                if want == have:
                    continue
                if fs is not None and fs.lsn > watermark:
                    lag.append(key)                 # changed after this replica's watermark
                elif have is None:
                    lost.append(key)
                elif want is None:
                    kept.append(key)
                else:
                    stale.append(key)
            drift = lost + stale + kept
            if drift:
                drifted.add(registration.replica_id)
                parts = [f"{n} {what}" for n, what in ((len(lost), "item(s) missing from its index"),
                                                      (len(stale), "item(s) with another vector"),
                                                      (len(kept), "removed item(s) still in its index")) if n]
                report.add(Finding(fn.FEATURES_INDEX, Severity.ERROR, registration.replica_id,
                                   f"ranker {registration.replica_id} at LSN {format_lsn(watermark)}: "
                                   + ", ".join(parts) + " (the feature store had them before that watermark: "
                                   "loss, not lag)", repairable=True, keys=drift, lsn_to=watermark,
                                   repair="resync_index", target=registration.replica_id))
            if lag:
                report.add(Finding(fn.FEATURES_INDEX, Severity.OK, registration.replica_id,
                                   f"ranker {registration.replica_id} is behind: {len(lag)} item change(s) "
                                   f"after its watermark {format_lsn(watermark)} not applied yet (lag)",
                                   keys=lag,
                                   lsn_from=watermark, lsn_to=report.watermark))
        for lsn, roots in roots_at.items():
            # Replicas at one watermark must hold the same index; a difference the comparison
            # with the feature store did not already explain is reported on its own.
            if len(set(roots.values())) > 1 and not drifted & set(roots):
                report.add(Finding(fn.FEATURES_INDEX, Severity.WARNING, "rankers",
                                   f"replicas at the same watermark {format_lsn(lsn)} hold different indexes "
                                   f"({len(set(roots.values()))} distinct digests: "
                                   + ", ".join(sorted(roots)) + ")"))

    # ------------------------------------------------------------------ 5. every event once
    def check_user_events(self, report: Report) -> None:
        s = self.sources
        keys, _, _ = self._compare(report, dg.USER_EVENTS, "events", "feature_store", s.event_users_digest,
                                   s.user_state_digest, lambda b: s.event_user_rows(buckets=b),
                                   lambda b: s.user_state_rows(buckets=b))
        settled = self.settle(keys, lambda ids: s.event_user_rows(user_ids=ids),
                              lambda ids: s.user_state_rows(user_ids=ids), self.settings.features_consumer)
        if settled.drift:
            events = s.event_user_rows(user_ids=settled.drift)
            state = s.user_state_rows(user_ids=settled.drift)
            lost = [k for k in settled.drift if _count(state.get(k)) < _count(events.get(k))]
            double = [k for k in settled.drift if _count(state.get(k)) > _count(events.get(k))]
            other = sorted(set(settled.drift) - set(lost) - set(double))
            first_lsn = min((state[k].lsn for k in settled.drift if k in state), default=0)
            parts = [f"{n} {what}" for n, what in (
                (len(lost), "user(s) with events never applied (lost deltas)"),
                (len(double), "user(s) with events applied twice"),
                (len(other), "user(s) whose history does not match their events")) if n]
            report.add(Finding(fn.USER_EVENTS, Severity.ERROR, "user_features",
                               ", ".join(parts) + f", between LSN {format_lsn(first_lsn)} (their last "
                               f"applied change) and {format_lsn(settled.applied_lsn)} (applied by features)",
                               repairable=True, keys=settled.drift, lsn_from=first_lsn,
                               lsn_to=settled.applied_lsn,
                               repair="rebuild_users"))
        self._lag_finding(report, fn.USER_EVENTS, self.settings.features_consumer, settled, "users")

    def check_trainer_events(self, report: Report) -> None:
        s = self.sources
        if not s.trainer_tables_exist():
            report.add(Finding(fn.TRAINER_EVENTS, Severity.OK, "trainer", "no trainer interaction log yet"))
            return
        keys, _, _ = self._compare(report, "trainer_events", "events", "trainer_log", s.event_trainer_digest,
                                   s.trainer_log_digest, lambda b: s.event_trainer_rows(buckets=b),
                                   lambda b: s.trainer_log_rows(buckets=b))
        settled = self.settle(keys, lambda ids: s.event_trainer_rows(user_ids=ids),
                              lambda ids: s.trainer_log_rows(user_ids=ids), self.settings.trainer_consumer)
        if settled.drift:
            log_rows = s.trainer_log_rows(user_ids=settled.drift)
            first_lsn = min((log_rows[k].lsn for k in settled.drift if k in log_rows), default=0)
            report.add(Finding(fn.TRAINER_EVENTS, Severity.ERROR, "trainer_interactions",
                               f"{len(settled.drift)} user(s) whose interactions in the trainer's log do not "
                               f"match the events table, up to LSN {format_lsn(settled.applied_lsn)} "
                               f"(applied by the "
                               f"trainer); a full retraining after a snapshot restart re-reads them",
                               keys=settled.drift, lsn_from=first_lsn, lsn_to=settled.applied_lsn))
        self._lag_finding(report, fn.TRAINER_EVENTS, self.settings.trainer_consumer, settled, "users")

    # ------------------------------------------------------------------ 6. replication and watermark
    def check_replication(self, report: Report) -> None:
        holders = {kv.key[len(COLLECTOR_SLOTS_PREFIX):]: kv.value.decode(errors="replace")
                   for kv in self.etcd.get_prefix(COLLECTOR_SLOTS_PREFIX)}
        seen = set()
        for slot in self.sources.slots():
            group = slot["group_name"] or ""
            name = slot["slot_name"]
            retained = max(0, int(slot["wal_lsn"]) - int(slot["restart_lsn"]))
            lag = max(0, int(slot["wal_lsn"]) - int(slot["confirmed_lsn"]))
            holder = holders.get(group, "")
            if not slot["active"] and not holder:
                key = ("slot", name)
                seen.add(key)
                idle_s = self.observations.seen(key)
                abandoned = idle_s >= self.settings.slot_abandoned_s
                report.add(Finding(fn.REPLICATION, Severity.ERROR if abandoned else Severity.OK, name,
                                   f"slot {name} ({'group ' + group if group else 'no consumer group'}) has "
                                   f"had no consumer for {idle_s:.0f} s and retains {_size(retained)} of WAL"
                                   + (": abandoned (it fills the disk); drop it by naming it in Reconcile "
                                      "drop_slots" if abandoned else ""),
                                   repairable=abandoned, keys=[name], repair="drop_slot", target=name))
                continue
            # Seconds behind: how long the slot's confirmed position has stood still while WAL
            # moved past it (across checks; 0 when caught up).
            still_key = ("still", name, int(slot["confirmed_lsn"]))
            behind_s = 0.0
            if lag > 0:
                seen.add(still_key)
                behind_s = self.observations.seen(still_key)
            lag_key = ("lag", name)
            where = f"consumer group {group or name}"
            if lag > self.settings.lag_warning_bytes:
                seen.add(lag_key)
                lasting_s = self.observations.seen(lag_key)
                severity = Severity.WARNING if lasting_s >= self.settings.lag_warning_s else Severity.OK
                report.add(Finding(fn.REPLICATION, severity, group or name,
                                   f"{where} is {_size(lag)} behind, for {lasting_s:.0f} s"))
            else:
                report.add(Finding(fn.REPLICATION, Severity.OK, group or name,
                                   f"{where}: lag {_size(lag)} ({behind_s:.0f} s), "
                                   f"retained WAL {_size(retained)}"
                                   + (f", held by {holder}" if holder else "")))
            if retained > self.settings.retained_wal_error_bytes:
                report.add(Finding(fn.REPLICATION, Severity.ERROR, name,
                                   f"slot {name} retains {_size(retained)} of WAL (limit "
                                   f"{_size(self.settings.retained_wal_error_bytes)})"))
        self.observations.keep_only("slot", {k for k in seen if k[0] == "slot"})
        self.observations.keep_only("lag", {k for k in seen if k[0] == "lag"})
        self.observations.keep_only("still", {k for k in seen if k[0] == "still"})

    def check_watermark(self, report: Report) -> None:
        applied = self.sources.applied_lsn(self.settings.features_consumer)
        value = self.etcd.get_json(DATA_WATERMARK)
        if value is None:
            if applied:
                report.add(Finding(fn.WATERMARK, Severity.WARNING, DATA_WATERMARK,
                                   f"{DATA_WATERMARK} is absent although features applied up to "
                                   f"{format_lsn(applied)}"))
            return
        published = int(value.get("lsn") or 0) if isinstance(value, dict) else 0
        if published > applied:
            report.add(Finding(fn.WATERMARK, Severity.ERROR, DATA_WATERMARK,
                               f"{DATA_WATERMARK} says {format_lsn(published)} but features applied only "
                               f"{format_lsn(applied)}: readers are promised data that is not there",
                               lsn_from=applied, lsn_to=published))
            return
        key = ("watermark", published, applied)
        behind_s = self.observations.seen(key) if published < applied else 0.0
        self.observations.keep_only("watermark", {key} if published < applied else set())
        lasting = published < applied and behind_s >= self.settings.lag_warning_s
        severity = Severity.WARNING if lasting else Severity.OK
        report.add(Finding(fn.WATERMARK, severity, DATA_WATERMARK,
                           f"{DATA_WATERMARK} {format_lsn(published)}, features applied {format_lsn(applied)}"
                           + (f" (behind for {behind_s:.0f} s)" if published < applied else "")))


def _count(row: Row | None) -> int:
    """Events a user row accounts for (the per-type counts)."""
    return 0 if row is None else sum(int(v) for v in row.value[:-1])


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
