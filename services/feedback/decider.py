"""Applies a canary decision: one decider at a time (etcd lease on `canary/decider`), every
decision one etcd transaction that compares `model/current`, `model/canary` and the decider's own
lease key with what the decision was taken on, then recorded with its evidence in
`model_versions` and the consistency service's history.

Promote: `model/current` := the canary's pointer (without `share`), `model/canary` deleted.
Abort: `model/canary` deleted. A decider whose lease expired, or that read values another writer
has since changed, writes nothing (two deciders racing never both write).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.common.etcd import Etcd, Leadership
from services.contracts.etcd_keys import CANARY_DECIDER, MODEL_CANARY, MODEL_CURRENT
from services.contracts.model_pointer import InvalidPointer, ModelPointer
from services.feedback.policy import ABORT, PROMOTE, Decision
from services.feedback.history_writer import record_canary_decision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pointers:
    current_raw: bytes | None
    canary_raw: bytes | None
    current: ModelPointer | None
    canary: ModelPointer | None


def read_pointers(etcd: Etcd) -> Pointers:
    current_kv, canary_kv = etcd.get(MODEL_CURRENT), etcd.get(MODEL_CANARY)
    current = canary = None
    try:
        current = ModelPointer.from_json(current_kv.value) if current_kv else None
    except InvalidPointer:
        pass
    try:
        canary = ModelPointer.from_json(canary_kv.value, canary=True) if canary_kv else None
    except InvalidPointer:
        pass
    return Pointers(current_kv.value if current_kv else None, canary_kv.value if canary_kv else None,
                    current, canary)


class CanaryDecider:
    def __init__(self, etcd: Etcd, engine: Engine | None, holder_id: str, ttl_s: int = 10) -> None:
        self.etcd, self.engine, self.holder_id = etcd, engine, holder_id
        self.leadership = Leadership(etcd, CANARY_DECIDER, holder_id, ttl_s)

    def apply(self, decision: Decision, seen: Pointers) -> bool:
        """Writes `decision` if this decider holds the lease and nothing changed since `seen`."""
        if decision.action not in (PROMOTE, ABORT) or seen.canary is None or seen.canary_raw is None:
            return False
        if not self.leadership.try_acquire():
            return False
        ops = [("delete", MODEL_CANARY, None)]
        if decision.action == PROMOTE:
            ops.append(("put", MODEL_CURRENT, ModelPointer(
                version=seen.canary.version, uri=seen.canary.uri, sha256=seen.canary.sha256,
                data_lsn=seen.canary.data_lsn, metrics=seen.canary.metrics).to_json()))
        compares = [(MODEL_CANARY, seen.canary_raw), (MODEL_CURRENT, seen.current_raw),
                    (CANARY_DECIDER, self.holder_id.encode())]
        if not self.etcd.transaction(compares, ops):
            log.info("canary decision not written: pointers or lease changed",
                     extra={"action": decision.action, "canary_version": seen.canary.version})
            return False
        log.info("canary decision", extra={"action": decision.action, "canary_version": seen.canary.version,
                                          "reason": decision.reason})
        if self.engine is not None:
            self._record(decision, seen)
        return True

    def _record(self, decision: Decision, seen: Pointers) -> None:
        detail = {"action": decision.action, "reason": decision.reason, "evidence": decision.evidence,
                  "canary_version": seen.canary.version,
                  "current_version": seen.current.version if seen.current else 0, "decider": self.holder_id}
        with self.engine.begin() as connection:
            connection.execute(sa.text(
                "UPDATE model_versions SET canary_decision = :a, canary_decided_at = now(), "
                "canary_evidence = CAST(:e AS jsonb) WHERE version = :v"),
                {"a": decision.action, "e": json.dumps(detail, default=str), "v": seen.canary.version})
        record_canary_decision(self.engine, self.holder_id, f"canary v{seen.canary.version}: "
                               f"{decision.action} ({decision.reason})", detail)
