"""Model lineage (`model_versions`) and the trainer's run bookkeeping (`trainer_runs`).

Version numbers are allocated durably BEFORE training: one transaction (serialised by an
advisory lock) inserts the `model_versions` row (status 'candidate') and its `trainer_runs` row
(phase 'training', with everything needed to redo the run: kind, seed, epochs, strategy, the LSN
range, the `as_of` data time, and the exact etcd value to compare-and-swap from). A crash at any
later point leaves a row that says how far the run got; the next leader finishes it or abandons
it (see `core.TrainerCore.recover`).

Every write of a run is fenced by its `attempt`: recovery takes a run over by incrementing the
attempt, after which the previous owner's writes match no row and it stops (`Fenced`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

ALLOCATION_LOCK = 724204  # pg_advisory_xact_lock key serialising version allocation

CANDIDATE, PUBLISHED, REJECTED, ROLLED_BACK = "candidate", "published", "rejected", "rolled_back"


class Fenced(Exception):
    """Another trainer took this run over (its attempt moved on): stop touching it."""


@dataclass
class VersionRow:
    version: int
    parent_version: int
    strategy: str
    parameters: dict
    lsn_from: int
    lsn_to: int
    metrics: dict
    baseline_metrics: dict
    train_seconds: float
    sha256: str
    artifact_uri: str
    status: str
    decision: str
    interactions: int
    items: int
    created_at: datetime | None
    baseline_version: int = 0
    # the comparisons recorded with the version (migration 0008)
    anchor_version: int = 0            # last full retrain the gate bounded the cumulative loss against
    anchor_metrics: dict = field(default_factory=dict)   # its metrics on the same slice
    gate_evidence: str = ""            # sufficient | insufficient | no_baseline
    full_version: int = 0              # shadow full retrain on the same data (incremental versions)
    full_metrics: dict = field(default_factory=dict)
    full_train_seconds: float = 0.0
    shadow_of: int = 0                 # on a shadow full retrain: the incremental version it measured
    # where it was published (migration 0010): "current", "canary" (TRAINER_PUBLISH_AS), "" = not
    published_as: str = ""
    canary_share: float = 0.0
    canary_decision: str = ""          # the decider's promote | abort (migration 0009), "" = none

    @property
    def canary_in_flight(self) -> bool:
        """Published as model/canary and not decided yet (its status stays 'candidate' until then)."""
        return self.published_as == "canary" and self.status == CANDIDATE

    @property
    def kind(self) -> str:
        return "full" if self.strategy == "full" else "update"


def describe_version(row: VersionRow, published: bool) -> str:
    """The one line the trainer prints per finished run (make run shows it)."""
    metrics = row.metrics or {}
    base = row.baseline_metrics or {}
    line = (f"trainer: version {row.version} ({row.strategy}, parent {row.parent_version or '-'}, "
            f"{row.interactions} interactions, {row.train_seconds:.1f}s) "
            f"{_outcome(row, published)}  "
            f"recall@10={metrics.get('recall_at_10', 0):.4f} ndcg@10={metrics.get('ndcg_at_10', 0):.4f}")
    if base:
        line += f"  (current: recall@10={base.get('recall_at_10', 0):.4f} ndcg@10={base.get('ndcg_at_10', 0):.4f})"
    if row.anchor_metrics:
        anchor = row.anchor_metrics
        line += (f"  (last full v{row.anchor_version}: recall@10={anchor.get('recall_at_10', 0):.4f} "
                 f"ndcg@10={anchor.get('ndcg_at_10', 0):.4f})")
    return line + f"  — {row.decision}"


def _outcome(row: VersionRow, published: bool) -> str:
    if row.canary_in_flight:
        return f"PUBLISHED AS CANARY (share {row.canary_share:g})"
    return "PUBLISHED" if published else row.status.upper()


@dataclass
class Run:
    version: int
    kind: str                     # "full" | "update"
    request: dict                 # seed, epochs, strategy, as_of, parent ...
    publish: bool
    baseline_version: int
    baseline_value: bytes | None  # etcd model/current as it was when the run started (None: absent)
    phase: str                    # training | trained | done
    attempt: int
    holder: str
    parent_version: int = 0
    lsn_from: int = 0
    lsn_to: int = 0
    extra: dict = field(default_factory=dict)


_VERSION_COLUMNS = ("v.version, COALESCE(v.parent_version, 0), v.strategy, v.parameters, v.lsn_from, v.lsn_to, "
                    "v.metrics, v.baseline_metrics, v.train_seconds, COALESCE(v.sha256, ''), "
                    "COALESCE(v.artifact_uri, ''), v.status, v.decision, v.interactions, v.items, v.created_at, "
                    "COALESCE(r.baseline_version, 0), COALESCE(v.anchor_version, 0), v.anchor_metrics, "
                    "COALESCE(v.gate_evidence, ''), COALESCE(v.full_version, 0), v.full_metrics, "
                    "COALESCE(v.full_train_seconds, 0), COALESCE(v.shadow_of, 0), COALESCE(v.published_as, ''), "
                    "COALESCE(v.canary_share, 0), COALESCE(v.canary_decision, '')")
_RUN_COLUMNS = ("r.version, r.kind, r.request, r.publish, r.baseline_version, r.baseline_value, r.phase, "
                "r.attempt, r.holder, COALESCE(v.parent_version, 0), v.lsn_from, v.lsn_to")


def _json(value: Any) -> dict:
    if value is None:
        return {}
    return value if isinstance(value, dict) else json.loads(value)


def _version(row) -> VersionRow:
    return VersionRow(int(row[0]), int(row[1]), row[2], _json(row[3]), int(row[4]), int(row[5]), _json(row[6]),
                      _json(row[7]), float(row[8]), row[9], row[10], row[11], row[12], int(row[13]),
                      int(row[14]), row[15], int(row[16]), int(row[17]), _json(row[18]), row[19], int(row[20]),
                      _json(row[21]), float(row[22]), int(row[23]), row[24], float(row[25]), row[26])


def _run(row) -> Run:
    return Run(int(row[0]), row[1], _json(row[2]), bool(row[3]), int(row[4]),
               None if row[5] is None else bytes(row[5]), row[6], int(row[7]), row[8], int(row[9]),
               int(row[10]), int(row[11]))


class VersionStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ------------------------------------------------------------------------------ runs
    def allocate(self, *, kind: str, parent_version: int, strategy: str, parameters: dict, lsn_from: int,
                 lsn_to: int, request: dict, publish: bool, baseline_version: int,
                 baseline_value: bytes | None, holder: str) -> Run:
        """The next version number, durably: model_versions (candidate) + trainer_runs (training)."""
        with self.engine.begin() as connection:
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": ALLOCATION_LOCK})
            version = int(connection.execute(sa.text(
                "SELECT COALESCE(max(version), 0) + 1 FROM model_versions")).scalar_one())
            connection.execute(sa.text(
                "INSERT INTO model_versions (version, parent_version, strategy, parameters, lsn_from, lsn_to, "
                "status, decision) VALUES (:v, :p, :s, CAST(:params AS jsonb), :lf, :lt, 'candidate', 'training')"),
                {"v": version, "p": parent_version or None, "s": strategy, "params": json.dumps(parameters),
                 "lf": lsn_from, "lt": lsn_to})
            connection.execute(sa.text(
                "INSERT INTO trainer_runs (version, kind, request, publish, baseline_version, baseline_value, "
                "phase, attempt, holder) VALUES (:v, :k, CAST(:r AS jsonb), :pub, :bv, :bval, 'training', 1, :h)"),
                {"v": version, "k": kind, "r": json.dumps(request), "pub": publish, "bv": baseline_version,
                 "bval": baseline_value, "h": holder})
        return Run(version, kind, request, publish, baseline_version, baseline_value, "training", 1, holder,
                   parent_version, lsn_from, lsn_to)

    def open_runs(self) -> list[Run]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text(
                f"SELECT {_RUN_COLUMNS} FROM trainer_runs r JOIN model_versions v USING (version) "
                "WHERE r.phase <> 'done' ORDER BY r.version")).all()
        return [_run(row) for row in rows]

    def take_over(self, run: Run, holder: str) -> Run:
        """Claims `run` for `holder` (attempt + 1); raises Fenced if it was finished meanwhile."""
        with self.engine.begin() as connection:
            row = connection.execute(sa.text(
                "UPDATE trainer_runs SET attempt = attempt + 1, holder = :h, updated_at = now() "
                "WHERE version = :v AND attempt = :a AND phase <> 'done' RETURNING attempt"),
                {"h": holder, "v": run.version, "a": run.attempt}).first()
        if row is None:
            raise Fenced(f"version {run.version} was taken over or finished by someone else")
        run.attempt, run.holder = int(row[0]), holder
        return run

    def _fenced_update(self, connection, run: Run, phase: str) -> None:
        updated = connection.execute(sa.text(
            "UPDATE trainer_runs SET phase = :phase, updated_at = now() "
            "WHERE version = :v AND attempt = :a AND phase <> 'done'"),
            {"phase": phase, "v": run.version, "a": run.attempt}).rowcount
        if updated != 1:
            raise Fenced(f"version {run.version}: attempt {run.attempt} is no longer the owner")
        run.phase = phase

    def record_trained(self, run: Run, *, metrics: dict, baseline_metrics: dict | None, train_seconds: float,
                       sha256: str, artifact_uri: str, interactions: int, items: int, decision: str,
                       parameters: dict | None = None, rejected: bool = False, anchor_version: int = 0,
                       anchor_metrics: dict | None = None, evidence: str = "", shadow_of: int = 0) -> None:
        """The artifact is stored and the gate has decided: phase 'trained' (or done+rejected)."""
        with self.engine.begin() as connection:
            self._fenced_update(connection, run, "done" if rejected else "trained")
            connection.execute(sa.text(
                "UPDATE model_versions SET metrics = CAST(:m AS jsonb), baseline_metrics = CAST(:b AS jsonb), "
                "train_seconds = :t, sha256 = :sha, artifact_uri = :uri, interactions = :n, items = :i, "
                "decision = :d, status = :status, anchor_version = :av, anchor_metrics = CAST(:am AS jsonb), "
                "gate_evidence = :ev, shadow_of = :so, "
                "parameters = CASE WHEN CAST(:p AS jsonb) IS NULL THEN parameters "
                "                  ELSE parameters || CAST(:p AS jsonb) END "
                "WHERE version = :v"),
                {"m": json.dumps(metrics), "b": json.dumps(baseline_metrics or {}), "t": train_seconds,
                 "sha": sha256, "uri": artifact_uri, "n": interactions, "i": items, "d": decision,
                 "status": REJECTED if rejected else CANDIDATE, "av": anchor_version or None,
                 "am": None if anchor_metrics is None else json.dumps(anchor_metrics), "ev": evidence or None,
                 "so": shadow_of or None,
                 "p": None if parameters is None else json.dumps(parameters), "v": run.version})

    def record_full_comparison(self, version: int, full_version: int, full_metrics: dict,
                               full_train_seconds: float) -> None:
        """On incremental `version`: the shadow full retrain on the same data and slice, and its cost."""
        with self.engine.begin() as connection:
            connection.execute(sa.text(
                "UPDATE model_versions SET full_version = :f, full_metrics = CAST(:m AS jsonb), "
                "full_train_seconds = :t WHERE version = :v"),
                {"f": full_version, "m": json.dumps(full_metrics), "t": full_train_seconds, "v": version})

    def run_request(self, version: int) -> dict:
        """The stored request of `version`'s run ({} when there is none)."""
        with self.engine.connect() as connection:
            return _json(connection.execute(sa.text("SELECT request FROM trainer_runs WHERE version = :v"),
                                            {"v": version}).scalar())

    def held_out_events(self, version: int) -> list[str]:
        """The event ids `version` held out for its gate (its run's request): its child trains on them."""
        return list(self.run_request(version).get("holdout_events", []))

    def newest_published_full(self) -> VersionRow | None:
        """The gate's anchor: the newest full training that was published (even if replaced since)."""
        with self.engine.connect() as connection:
            row = connection.execute(sa.text(
                f"SELECT {_VERSION_COLUMNS} FROM model_versions v LEFT JOIN trainer_runs r USING (version) "
                "WHERE v.strategy = 'full' AND v.status = 'published' "
                "AND v.artifact_uri IS NOT NULL ORDER BY v.version DESC LIMIT 1")).first()
        return None if row is None else _version(row)

    def finish(self, run: Run, status: str, decision: str, *, sha256: str | None = None,
               artifact_uri: str | None = None, published_as: str | None = None,
               canary_share: float | None = None) -> None:
        """Terminal state of a run: published, rejected, or left a candidate (record-only, held,
        or published as the canary: `published_as` 'canary', decided later by `settle_canary`)."""
        with self.engine.begin() as connection:
            self._fenced_update(connection, run, "done")
            connection.execute(sa.text(
                "UPDATE model_versions SET status = :s, decision = :d, "
                "sha256 = COALESCE(:sha, sha256), artifact_uri = COALESCE(:uri, artifact_uri), "
                "published_as = COALESCE(:pa, published_as), canary_share = COALESCE(:cs, canary_share) "
                "WHERE version = :v"),
                {"s": status, "d": decision, "sha": sha256, "uri": artifact_uri, "pa": published_as,
                 "cs": canary_share, "v": run.version})

    def canaries_in_flight(self) -> list[VersionRow]:
        """Versions published as model/canary whose decision the trainer has not recorded yet."""
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text(
                f"SELECT {_VERSION_COLUMNS} FROM model_versions v LEFT JOIN trainer_runs r USING (version) "
                "WHERE v.published_as = 'canary' AND v.status = 'candidate' ORDER BY v.version")).all()
        return [_version(row) for row in rows]

    def settle_canary(self, version: int, status: str, note: str) -> bool:
        """A canary's outcome: 'published' (it became model/current) or 'rejected' (aborted);
        only while it is still undecided (two trainers settling it write once)."""
        with self.engine.begin() as connection:
            return connection.execute(sa.text(
                "UPDATE model_versions SET status = :s, decision = decision || :note "
                "WHERE version = :v AND published_as = 'canary' AND status = 'candidate'"),
                {"s": status, "note": f"; {note}", "v": version}).rowcount == 1

    def set_decision(self, run: Run, decision: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.text(
                "UPDATE model_versions SET decision = :d WHERE version = :v AND EXISTS ("
                "SELECT 1 FROM trainer_runs WHERE version = :v AND attempt = :a)"),
                {"d": decision, "v": run.version, "a": run.attempt})

    # ------------------------------------------------------------------------------ versions
    def get(self, version: int) -> VersionRow | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.text(
                f"SELECT {_VERSION_COLUMNS} FROM model_versions v LEFT JOIN trainer_runs r USING (version) "
                "WHERE v.version = :v"), {"v": version}).first()
        return None if row is None else _version(row)

    def list(self, limit: int = 50) -> list[VersionRow]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.text(
                f"SELECT {_VERSION_COLUMNS} FROM model_versions v LEFT JOIN trainer_runs r USING (version) "
                "ORDER BY v.version DESC LIMIT :n"), {"n": limit}).all()
        return [_version(row) for row in rows]

    def rollback_hold_lsn(self, version: int) -> int:
        """The newest data a version rolled back to `version`, or a canary of `version` that was
        aborted, was trained on (0: none): the loop waits for new interactions past it before
        updating again (see scheduler.py), instead of re-learning at once what was turned down."""
        with self.engine.connect() as connection:
            return int(connection.execute(sa.text(
                "SELECT COALESCE(max(v.lsn_to), 0) FROM model_versions v LEFT JOIN trainer_runs r USING (version) "
                "WHERE (v.status = 'rolled_back' AND v.rolled_back_to = :v) OR (v.published_as = 'canary' "
                "AND v.status = 'rejected' AND r.baseline_version = :v)"), {"v": version}).scalar_one())

    def latest_version(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(sa.text("SELECT COALESCE(max(version), 0) FROM model_versions")).scalar_one())
