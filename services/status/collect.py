"""Gathering a Snapshot of the suite: each part is asked with a short deadline, and a part that
does not answer shows as such instead of stopping the others."""
from __future__ import annotations

import dataclasses
import json
import socket
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deltarec.v1 import (collector_pb2, collector_pb2_grpc, consistency_pb2, consistency_pb2_grpc,
                         features_pb2, features_pb2_grpc, ranker_pb2, ranker_pb2_grpc, trainer_pb2,
                         trainer_pb2_grpc)
from services.common.channels import client_channel, split_targets
from services.common.etcd import Etcd
from services.contracts.etcd_keys import DATA_WATERMARK, MODEL_CANARY, MODEL_CURRENT, RANKERS_PREFIX

SERVICES = ("collector", "features", "trainer", "ranker", "consistency")


@dataclasses.dataclass
class Health:
    service: str
    address: str
    status: str                     # SERVING, NOT_SERVING, UNREACHABLE (code), ...


@dataclasses.dataclass
class RankerRow:
    replica_id: str
    address: str
    model_version: int = 0
    data_lsn: int = 0
    index_size: int = 0
    index_checksum: str = ""
    canary_version: int = 0
    canary_share: float = 0.0
    refused: str = ""
    source: str = "Status"          # "Status" (the replica answered) or "etcd" (its registration)


@dataclasses.dataclass
class GroupRow:
    name: str
    confirmed_lsn: int
    retained_wal_bytes: int
    active: bool
    holder: str
    snapshot_done: bool


@dataclasses.dataclass
class VersionRow:
    version: int
    parent: int
    strategy: str
    status: str
    ndcg_at_10: float
    baseline_ndcg_at_10: float
    decision: str


@dataclasses.dataclass
class Snapshot:
    health: list[Health] = dataclasses.field(default_factory=list)
    current: dict | None = None                 # etcd model/current
    canary: dict | None = None                  # etcd model/canary
    watermark: dict | None = None               # etcd data/watermark
    rankers: list[RankerRow] = dataclasses.field(default_factory=list)
    groups: list[GroupRow] = dataclasses.field(default_factory=list)
    features: dict | None = None
    trainer: dict | None = None
    versions: list[VersionRow] = dataclasses.field(default_factory=list)
    consistency: dict | None = None             # the last check
    errors: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def addresses(target: str) -> list[str]:
    """Every address behind a target: each A record of a dns:/// name (one per pod of a headless
    Service), each address of an ipv4:/ipv6: list, or the host:port itself."""
    found: list[str] = []
    for one in split_targets(target):
        if one.startswith(("ipv4:", "ipv6:")):
            found.extend(address for address in one.split(":", 1)[1].split(",") if address)
        elif one.startswith("dns:///"):
            host, port = one[len("dns:///"):].rsplit(":", 1)
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror:
                found.append(one[len("dns:///"):])
                continue
            for info in infos:
                ip = info[4][0]
                address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                if address not in found:
                    found.append(address)
        else:
            found.append(one)
    return found


def check_health(address: str, timeout_s: float = 2.0) -> str:
    channel = client_channel(address)         # TLS and credentials from the environment, like every client
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    except grpc.RpcError as error:
        return f"UNREACHABLE ({error.code().name})"
    finally:
        channel.close()


class Collector:
    """Asks every part once per `snapshot()`."""

    def __init__(self, targets: dict[str, str], etcd: Etcd | None, timeout_s: float = 2.0,
                 versions: int = 5) -> None:
        self.targets = {name: target for name, target in targets.items() if target}
        self.etcd, self.timeout_s, self.versions = etcd, timeout_s, versions

    def _channel(self, name: str) -> grpc.Channel | None:
        target = self.targets.get(name)
        return client_channel(target) if target else None

    def snapshot(self) -> Snapshot:
        snapshot = Snapshot()
        registrations = self._etcd(snapshot)
        ranker_addresses = [r.get("address", "") for r in registrations.values() if r.get("address")]
        if "ranker" not in self.targets and ranker_addresses:
            self.targets["ranker"] = ",".join(ranker_addresses)
        with futures.ThreadPoolExecutor(max_workers=8) as pool:
            health = [(name, address, pool.submit(check_health, address, self.timeout_s))
                      for name in SERVICES if name in self.targets for address in addresses(self.targets[name])]
            rankers = {replica: pool.submit(self._ranker, replica, value) for replica, value in registrations.items()}
            parts = {name: pool.submit(getattr(self, f"_{name}"), snapshot)
                     for name in ("collector", "features", "trainer", "consistency") if name in self.targets}
            snapshot.health = [Health(name, address, result.result()) for name, address, result in health]
            snapshot.rankers = [rankers[replica].result() for replica in sorted(rankers)]
            for name, part in parts.items():
                try:
                    part.result()
                except grpc.RpcError as error:
                    snapshot.errors.append(f"{name}: {error.code().name} {(error.details() or '')[:120]}")
        return snapshot

    # ------------------------------------------------------------------ parts
    def _etcd(self, snapshot: Snapshot) -> dict[str, dict]:
        if self.etcd is None:
            return {}
        try:
            snapshot.current = self.etcd.get_json(MODEL_CURRENT)
            snapshot.canary = self.etcd.get_json(MODEL_CANARY)
            snapshot.watermark = self.etcd.get_json(DATA_WATERMARK)
            registrations = {}
            for kv in self.etcd.get_prefix(RANKERS_PREFIX):
                try:
                    value = kv.json()
                except ValueError:
                    value = {}
                registrations[kv.key[len(RANKERS_PREFIX):]] = value if isinstance(value, dict) else {}
            return registrations
        except Exception as error:  # noqa: BLE001 - an unreachable etcd is one line of the report
            snapshot.errors.append(f"etcd: {str(error)[:160] or type(error).__name__}")
            return {}

    def _ranker(self, replica_id: str, registration: dict[str, Any]) -> RankerRow:
        address = registration.get("address", "")
        row = RankerRow(replica_id, address, int(registration.get("model_version", 0)),
                        int(registration.get("data_lsn", 0)), int(registration.get("index_size", 0)),
                        str(registration.get("index_checksum", "")), int(registration.get("canary_version", 0)),
                        float(registration.get("canary_share", 0.0)),
                        _refused(registration.get("refused_version", 0), registration.get("refused_reason", "")),
                        source="etcd")
        if not address:
            return row
        channel = client_channel(address, service="deltarec.v1.RankerService")
        try:
            status = ranker_pb2_grpc.RankerServiceStub(channel).Status(
                ranker_pb2.RankerServiceStatusRequest(), timeout=self.timeout_s)
        except grpc.RpcError:
            return row
        finally:
            channel.close()
        return RankerRow(status.replica_id or replica_id, address, status.freshness.model_version,
                         status.freshness.data_lsn, status.index_size, status.index_checksum,
                         status.canary_version, status.canary_share,
                         _refused(status.refused_version, status.refused_reason))

    def _collector(self, snapshot: Snapshot) -> None:
        response = collector_pb2_grpc.CollectorServiceStub(self._channel("collector")).ListConsumerGroups(
            collector_pb2.ListConsumerGroupsRequest(), timeout=self.timeout_s)
        snapshot.groups = [GroupRow(g.name, g.confirmed_flush_lsn, g.retained_wal_bytes, g.active, g.holder,
                                    g.snapshot_done) for g in response.groups]

    def _features(self, snapshot: Snapshot) -> None:
        status = features_pb2_grpc.FeaturesServiceStub(self._channel("features")).Status(
            features_pb2.FeaturesServiceStatusRequest(), timeout=self.timeout_s)
        snapshot.features = {"applied_lsn": status.applied_lsn, "lag_bytes": status.lag_bytes,
                             "lag_seconds": status.lag_seconds, "active_items": status.active_items,
                             "users": status.users, "connected": status.connected,
                             "snapshot_done": status.snapshot_done,
                             "text_model_state": status.text_model_state or "ready"}

    def _trainer(self, snapshot: Snapshot) -> None:
        stub = trainer_pb2_grpc.TrainerServiceStub(self._channel("trainer"))
        status = stub.Status(trainer_pb2.TrainerServiceStatusRequest(), timeout=self.timeout_s)
        snapshot.trainer = {"leader_id": status.leader_id, "current_version": status.current_version,
                            "latest_version": status.latest_version, "busy": status.busy,
                            "pending_interactions": status.pending_interactions,
                            "recorded_lsn": status.recorded_lsn}
        versions = stub.ListVersions(trainer_pb2.ListVersionsRequest(limit=self.versions), timeout=self.timeout_s)
        snapshot.versions = [
            VersionRow(v.version, v.parent_version, v.strategy,
                       trainer_pb2.VersionStatus.Name(v.status).removeprefix("VERSION_STATUS_").lower(),
                       v.metrics.ndcg_at_10, v.baseline_metrics.ndcg_at_10, v.decision)
            for v in versions.versions]

    def _consistency(self, snapshot: Snapshot) -> None:
        history = consistency_pb2_grpc.ConsistencyServiceStub(self._channel("consistency")).History(
            consistency_pb2.HistoryRequest(limit=1, kind="check"), timeout=self.timeout_s)
        if history.entries:
            entry = history.entries[0]
            try:
                detail = json.loads(entry.detail_json or "{}")
            except ValueError:
                detail = {}
            findings = detail.get("findings", []) if isinstance(detail, dict) else []
            snapshot.consistency = {
                "at": entry.at.ToDatetime().isoformat(timespec="seconds") + "Z" if entry.HasField("at") else "",
                "consistent": entry.consistent, "detail": entry.detail,
                "problems": [f for f in findings
                             if isinstance(f, dict) and f.get("severity") in ("warning", "error")]}


def _refused(version: int, reason: str) -> str:
    return f"v{version}: {reason}" if version else ""
