"""`Reconcile`: repairs what a Check found, then checks again.

One action per repairable finding, in an order where each repair can rely on the previous
ones: the feature store first (re-embed drifted items through features.Resync, rebuild users'
state through features.RebuildUsers), then what etcd names (a current artifact that fails
verification is rolled back, a bad canary aborted), then the rankers (reload the model, resync
the index), then dead registrations.
A replication slot is dropped only when the request names it. With dry_run every action is
reported and none is done.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable

import grpc

from deltarec.v1 import collector_pb2, collector_pb2_grpc, features_pb2, features_pb2_grpc
from services.common import channels
from services.common.errors import DeltaRecError
from services.common.etcd import Etcd
from services.consistency import findings as fn
from services.consistency.findings import Finding, Report
from services.consistency.replicas import ReplicaUnreachable, Replicas
from services.consistency.rollback import Rollbacks
from services.contracts.etcd_keys import MODEL_CANARY

log = logging.getLogger(__name__)

ORDER = ("resync_items", "rebuild_users", "rollback_current", "abort_canary", "resync_index", "reload_model",
         "delete_registration", "drop_slot")
CHUNK = 10_000


@dataclass
class Action:
    check: str
    subject: str
    action: str
    done: bool = False
    outcome: str = ""


class Repairer:
    def __init__(self, etcd: Etcd, replicas: Replicas, rollbacks: Rollbacks, *, features_address: str = "",
                 collector_address: str = "", drop_slot_sql: Callable[[str], bool] | None = None,
                 timeout_s: float = 120.0, max_keys: int = CHUNK) -> None:
        self.etcd, self.replicas, self.rollbacks = etcd, replicas, rollbacks
        self.features_address, self.collector_address = features_address, collector_address
        self.drop_slot_sql = drop_slot_sql
        self.timeout_s, self.max_keys = timeout_s, min(max_keys, CHUNK)

    def plan(self, report: Report, drop_slots: list[str]) -> list[tuple[Finding, str]]:
        """(finding, action description) for every repairable bad finding, in repair order."""
        named = set(drop_slots)
        planned = []
        for finding in report.bad_findings():
            if not finding.repairable or not finding.repair:
                continue
            if finding.repair == "drop_slot" and finding.target not in named:
                continue
            planned.append(finding)
        planned.sort(key=lambda f: ORDER.index(f.repair) if f.repair in ORDER else len(ORDER))
        return [(finding, self.describe(finding)) for finding in planned]

    @staticmethod
    def describe(finding: Finding) -> str:
        n = finding.key_count
        return {
            "resync_items": f"re-embed {n} item(s) through features.Resync",
            "rebuild_users": f"rebuild the state of {n} user(s) from the events table "
                             f"(features.RebuildUsers)",
            "resync_index": f"make ranker {finding.target} resync its index from the feature store",
            "reload_model": f"make ranker {finding.target} reload model/current (v{finding.model_version})",
            "delete_registration": f"delete the dead registration rankers/{finding.target}",
            "rollback_current": f"roll model/current back from v{finding.model_version} to the newest "
                                f"earlier version whose artifact verifies",
            "abort_canary": f"abort the canary v{finding.model_version} (delete model/canary)",
            "drop_slot": f"drop the abandoned replication slot {finding.target}",
        }.get(finding.repair, finding.repair)

    def reconcile(self, report: Report, *, dry_run: bool, drop_slots: list[str]) -> list[Action]:
        actions = []
        planned = self.plan(report, drop_slots)
        for name in drop_slots:
            if not any(f.repair == "drop_slot" and f.target == name for f, _ in planned):
                actions.append(Action(fn.REPLICATION, name, f"drop slot {name}", False,
                                      "not dropped: the check did not find it abandoned"))
        for finding, description in planned:
            action = Action(finding.check, finding.subject, description)
            if dry_run:
                action.outcome = "dry run: not done"
            else:
                try:
                    action.outcome = self._do(finding)
                    action.done = True
                except (DeltaRecError, ReplicaUnreachable, grpc.RpcError, RuntimeError) as error:
                    details = error.details() if isinstance(error, grpc.RpcError) else str(error)
                    action.outcome = f"failed: {details[:300]}"
                    log.warning("repair failed", extra={"action": finding.repair, "subject": finding.subject,
                                                        "error": details[:300]})
            actions.append(action)
        return actions

    # ------------------------------------------------------------------ the repairs
    def _features(self) -> features_pb2_grpc.FeaturesServiceStub:
        if not self.features_address:
            raise RuntimeError("no FEATURES_ADDRESS configured: cannot ask features to repair")
        return features_pb2_grpc.FeaturesServiceStub(channels.make_channel(self.features_address, channels.FEATURES))

    def _registration(self, replica_id: str):
        for registration in self.replicas.registrations():
            if registration.replica_id == replica_id:
                return registration
        return None

    def _do(self, finding: Finding) -> str:
        repair = finding.repair
        if repair == "resync_items":
            stub, recomputed, missing = self._features(), 0, 0
            for start in range(0, len(finding.keys), self.max_keys):
                chunk = finding.keys[start:start + self.max_keys]
                response = stub.Resync(features_pb2.ResyncRequest(item_ids=chunk), timeout=self.timeout_s)
                recomputed += response.recomputed
                missing += len(response.not_found)
            return f"re-embedded {recomputed}, {missing} gone from the catalog (removed)"
        if repair == "rebuild_users":
            stub, rebuilt, removed = self._features(), 0, 0
            for start in range(0, len(finding.keys), self.max_keys):
                response = stub.RebuildUsers(features_pb2.RebuildUsersRequest(
                    user_ids=finding.keys[start:start + self.max_keys]), timeout=self.timeout_s)
                rebuilt += response.rebuilt
                removed += response.removed
            return f"rebuilt {rebuilt} user(s), removed {removed}"
        if repair in ("resync_index", "reload_model"):
            registration = self._registration(finding.target)
            if registration is None:
                return "the replica is gone: nothing to do"
            response = self.replicas.reload(registration, model=repair == "reload_model",
                                            index=repair == "resync_index", timeout_s=self.timeout_s)
            return (f"ranker {finding.target} now serves v{response.model_version}, "
                    f"{response.index_size} items at LSN {response.data_lsn}")
        if repair == "delete_registration":
            registration = self._registration(finding.target)
            if registration is None:
                return "already gone (its lease expired)"
            if self.replicas.delete(registration):
                return "deleted"
            return "kept: the replica re-registered meanwhile"
        if repair == "rollback_current":
            result = self.rollbacks.rollback_to_last_good(
                finding.model_version, f"the artifact of v{finding.model_version} failed verification")
            return f"model/current rolled back from v{result.previous_version} to v{result.current_version}"
        if repair == "abort_canary":
            kv = self.etcd.get(MODEL_CANARY)
            if kv is None:
                return "already gone"
            return "model/canary deleted" if self.etcd.compare_and_delete(MODEL_CANARY, kv.value) else \
                "kept: model/canary changed meanwhile"
        if repair == "drop_slot":
            return self._drop_slot(finding.target)
        raise RuntimeError(f"unknown repair {repair!r}")

    def _drop_slot(self, slot: str) -> str:
        group = ""
        if self.collector_address:
            # The collector knows which group the slot belongs to and removes its bookkeeping too.
            stub = collector_pb2_grpc.CollectorServiceStub(
                channels.make_channel(self.collector_address, channels.COLLECTOR))
            groups = stub.ListConsumerGroups(collector_pb2.ListConsumerGroupsRequest(),
                                             timeout=self.timeout_s).groups
            group = next((g.name for g in groups if g.slot_name == slot), "")
            if group:
                dropped = stub.DropConsumerGroup(collector_pb2.DropConsumerGroupRequest(consumer_group=group),
                                                 timeout=self.timeout_s).dropped
                return f"consumer group {group} and its slot dropped" if dropped else "not dropped"
        if self.drop_slot_sql is None:
            raise RuntimeError("cannot drop slots here")
        return "slot dropped" if self.drop_slot_sql(slot) else "not dropped: it is in use or gone"


def actions_to_dicts(actions: list[Action]) -> list[dict]:
    return [asdict(action) for action in actions]
