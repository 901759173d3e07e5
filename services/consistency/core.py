"""The consistency service's core: Check, Reconcile, Rollback, History, the repair lease and
the periodic check loop, over plain Python parts (no gRPC here)."""
from __future__ import annotations

import logging
import threading
import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.etcd import Etcd, EtcdUnavailable, Leadership
from services.consistency import metrics
from services.consistency.checker import Checker, CheckSettings, Observations
from services.consistency.findings import ALL_CHECKS, Report, Severity, plain_words
from services.consistency.history import KINDS, History
from services.consistency.repair import Action, Repairer, actions_to_dicts
from services.consistency.replicas import Replicas
from services.consistency.rollback import RollbackResult, Rollbacks
from services.consistency.sources import Sources
from services.consistency.versions import ModelVersions
from services.contracts.etcd_keys import CONSISTENCY_REPAIRER

log = logging.getLogger(__name__)


class RepairLease:
    """The repair role, campaigned for in the background: only its holder repairs or rolls back."""

    def __init__(self, etcd: Etcd, holder_id: str, ttl_s: int) -> None:
        self.leadership = Leadership(etcd, CONSISTENCY_REPAIRER, holder_id, ttl_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="repair-lease", daemon=True)

    def start(self) -> "RepairLease":
        self._thread.start()
        return self

    @property
    def held(self) -> bool:
        return self.leadership.held

    def holder(self) -> str:
        try:
            return self.leadership.holder() or ""
        except EtcdUnavailable:
            return ""

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.leadership.held:
                self.leadership.lease = None
                if self.leadership.campaign(self._stop):
                    log.info("holding the repair lease", extra={"holder": self.leadership.holder_id})
            metrics.REPAIRER.set(1 if self.leadership.held else 0)
            self._stop.wait(0.5)

    def require(self) -> None:
        if not self.held:
            holder = self.holder()
            raise FailedPrecondition("another consistency instance holds the repair lease"
                                     + (f" ({holder})" if holder else "")
                                     + "; only it repairs and rolls back")

    def stop(self) -> None:
        self._stop.set()
        try:
            self.leadership.resign()
        except Exception:  # noqa: BLE001 - the lease expires by itself
            pass


class ConsistencyCore:
    def __init__(self, config, engine: Engine, etcd: Etcd, instance_id: str) -> None:
        self.config, self.engine, self.etcd = config, engine, etcd
        self.instance_id = instance_id
        self.sources = Sources(engine, history_length=config.history_length,
                               trainer_consumer=config.trainer_consumer)
        self.versions = ModelVersions(engine)
        self.replicas = Replicas(etcd, config.replica_timeout_s)
        self.observations = Observations()
        self.checker = Checker(self.sources, etcd, self.replicas, self.versions.get,
                               settings=CheckSettings.from_config(config), artifact_engine=engine,
                               observations=self.observations)
        self.rollbacks = Rollbacks(etcd, self.versions, artifact_engine=engine)
        self.repairer = Repairer(etcd, self.replicas, self.rollbacks,
                                 features_address=config.features_address,
                                 collector_address=config.collector_address,
                                 drop_slot_sql=self._drop_slot_sql, timeout_s=config.repair_timeout_s,
                                 max_keys=config.max_repair_keys)
        self.history = History(engine, self.instance_id, config.history_keep)
        self.lease = RepairLease(etcd, self.instance_id, config.leader_ttl_s)
        self.last_report: Report | None = None
        self._repair_lock = threading.Lock()
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ConsistencyCore":
        self.lease.start()
        if self.config.check_interval_s > 0:
            self._loop = threading.Thread(target=self._run_loop, name="check-loop", daemon=True)
            self._loop.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.lease.stop()
        self.replicas.close()

    def _run_loop(self) -> None:
        while not self._stop.wait(self.config.check_interval_s):
            try:
                self.check()
            except Exception as error:  # noqa: BLE001 - the next period retries
                log.warning("periodic check failed",
                            extra={"error": f"{type(error).__name__}: {error}"[:300]})

    # ------------------------------------------------------------------ check
    def check(self, checks: list[str] | tuple[str, ...] = (), record: bool = True) -> Report:
        report = self.checker.check(checks)
        self._observe(report, complete=not checks or set(checks) == set(ALL_CHECKS))
        if record:
            self.history.record("check", report.summary(), report.to_dict(), report.consistent)
        level = logging.INFO if report.consistent else logging.WARNING
        log.log(level, "check", extra={"consistent": report.consistent, "watermark": report.watermark,
                                       "findings": [plain_words(f) for f in report.bad_findings()][:20],
                                       "seconds": round(report.seconds, 3)})
        self.last_report = report
        return report

    def _observe(self, report: Report, complete: bool) -> None:
        metrics.CHECKS.labels("consistent" if report.consistent else "inconsistent").inc()
        metrics.CHECK_SECONDS.observe(report.seconds)
        metrics.LAST_CHECK.set(report.checked_at)
        if report.consistent and complete:
            metrics.LAST_CONSISTENT.set(report.checked_at)
        for digest in report.digests:
            metrics.DIGEST_SECONDS.labels(digest.kind).observe(digest.seconds)
        counts: dict[tuple[str, str], int] = {}
        keys: dict[str, int] = {}
        for finding in report.findings:
            label = (finding.check, finding.severity.name.lower())
            counts[label] = counts.get(label, 0) + 1
            if finding.severity is Severity.ERROR:
                keys[finding.check] = keys.get(finding.check, 0) + finding.key_count
        for check in ALL_CHECKS:
            for severity in ("ok", "warning", "error"):
                metrics.FINDINGS.labels(check, severity).set(counts.get((check, severity), 0))
            metrics.DRIFTED_KEYS.labels(check).set(keys.get(check, 0))

    # ------------------------------------------------------------------ reconcile
    def reconcile(self, *, dry_run: bool,
                  drop_slots: list[str]) -> tuple[list[Action], Report, Report | None]:
        if not dry_run:
            self.lease.require()
        with self._repair_lock:
            before = self.check(record=False)
            actions = self.repairer.reconcile(before, dry_run=dry_run, drop_slots=drop_slots)
            for action in actions:
                outcome = "done" if action.done else "not_done"
                metrics.REPAIRS.labels(action.action.split(" ")[0], outcome).inc()
            after = None
            if not dry_run and any(action.done for action in actions):
                after = self.check(record=False)
            if after is None:
                outcome = before.summary()
            else:
                outcome = "consistent afterwards" if after.consistent else "still inconsistent"
            summary = (f"{'dry run: ' if dry_run else ''}{sum(a.done for a in actions)} of {len(actions)} "
                       f"action(s) done; {outcome}")
            detail = {"dry_run": dry_run, "actions": actions_to_dicts(actions), "before": before.summary(),
                      "after": after.summary() if after else None}
            self.history.record("reconcile", summary, detail,
                                after.consistent if after is not None else before.consistent)
            return actions, before, after

    # ------------------------------------------------------------------ rollback
    def rollback(self, version: int) -> RollbackResult:
        self.lease.require()
        with self._repair_lock:
            try:
                result = self.rollbacks.rollback(version, f"requested from {self.instance_id}")
            except Exception as error:
                metrics.ROLLBACKS.labels(type(error).__name__).inc()
                self.history.record("rollback", f"rollback to v{version} refused: {error}",
                                    {"version": version, "error": str(error)})
                raise
            metrics.ROLLBACKS.labels("done" if result.changed else "already_current").inc()
            summary = (f"model/current v{result.previous_version} -> v{result.current_version}"
                       if result.changed else f"v{version} was already current")
            self.history.record("rollback", summary,
                                {"from_version": result.previous_version,
                                 "to_version": result.current_version, "sha256": result.sha256,
                                 "changed": result.changed})
            return result

    # ------------------------------------------------------------------ history
    def entries(self, limit: int, kind: str):
        if kind and kind not in KINDS:
            raise InvalidArgument(f"kind: must be one of {', '.join(KINDS)} (or empty)")
        if limit > 1000:
            raise InvalidArgument("limit: at most 1000")
        return self.history.entries(limit or 50, kind)

    # ------------------------------------------------------------------ helpers
    def _drop_slot_sql(self, slot: str) -> bool:
        with self.engine.begin() as connection:
            active = connection.execute(sa.text(
                "SELECT active FROM pg_replication_slots "
                "WHERE slot_name = :s AND database = current_database()"),
                {"s": slot}).scalar()
            if active is None or active:
                return False
            connection.execute(sa.text("SELECT pg_drop_replication_slot(:s)"), {"s": slot})
            if connection.execute(sa.text("SELECT to_regclass('cdc_consumer_groups') IS NOT NULL")).scalar():
                connection.execute(sa.text("DELETE FROM cdc_consumer_groups WHERE slot_name = :s"),
                                   {"s": slot})
        return True

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Postgres reachable and migrated (the history table exists)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with self.engine.connect() as connection:
                    connection.execute(sa.text("SELECT 1 FROM consistency_history LIMIT 1"))
                return
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
