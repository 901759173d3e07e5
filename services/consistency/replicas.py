"""The ranker replicas as the consistency service sees them: their registrations under
`rankers/` in etcd and their IndexDigest / Reload RPCs."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import grpc

from deltarec.v1 import ranker_pb2, ranker_pb2_grpc
from services.common import channels
from services.common.etcd import Etcd
from services.contracts import digest as dg
from services.contracts.etcd_keys import RANKERS_PREFIX, ranker_key

log = logging.getLogger(__name__)

MAX_DETAIL_BUCKETS = 64


@dataclass
class Registration:
    replica_id: str
    value: dict
    raw: bytes
    lease_id: int = 0

    @property
    def address(self) -> str:
        return str(self.value.get("address") or "")

    @property
    def model_version(self) -> int:
        return int(self.value.get("model_version") or 0)


@dataclass
class IndexSnapshot:
    replica_id: str
    data_lsn: int
    digest: dg.Digest
    items: int
    model_version: int
    entries: dict[str, str] = field(default_factory=dict)


class ReplicaUnreachable(Exception):
    pass


class Replicas:
    def __init__(self, etcd: Etcd, timeout_s: float = 5.0) -> None:
        self.etcd, self.timeout_s = etcd, timeout_s
        self._channels: dict[str, grpc.Channel] = {}

    def registrations(self) -> list[Registration]:
        found = []
        for kv in self.etcd.get_prefix(RANKERS_PREFIX):
            replica_id = kv.key[len(RANKERS_PREFIX):]
            try:
                value = json.loads(kv.value)
            except ValueError:
                value = {}
            found.append(Registration(replica_id, value if isinstance(value, dict) else {}, kv.value,
                                      kv.lease_id))
        return sorted(found, key=lambda r: r.replica_id)

    def delete(self, registration: Registration) -> bool:
        """Deletes a registration only if it still holds what was checked (a replica that came
        back and re-registered is left alone)."""
        return self.etcd.compare_and_delete(ranker_key(registration.replica_id), registration.raw)

    def _stub(self, address: str) -> ranker_pb2_grpc.RankerServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = channels.make_channel(address, channels.RANKER)
        return ranker_pb2_grpc.RankerServiceStub(channel)

    def index_digest(self, registration: Registration,
                     detail_buckets: list[int] | None = None) -> IndexSnapshot:
        if not registration.address:
            raise ReplicaUnreachable("its registration names no address")
        try:
            response = self._stub(registration.address).IndexDigest(
                ranker_pb2.IndexDigestRequest(detail_buckets=list(detail_buckets or [])[:MAX_DETAIL_BUCKETS]),
                timeout=self.timeout_s)
        except grpc.RpcError as error:
            raise ReplicaUnreachable(f"{error.code().name}: {error.details()}") from None
        digest = dg.Digest.of_aggregates(dg.INDEX_ITEMS,
                                         ((b.bucket, b.count, b.xor) for b in response.buckets),
                                         response.num_buckets or dg.NUM_BUCKETS)
        return IndexSnapshot(registration.replica_id, response.data_lsn, digest, response.items,
                             response.model_version, {e.item_id: e.fingerprint for e in response.entries})

    def entries(self, registration: Registration, buckets: list[int]) -> IndexSnapshot:
        """The entries of `buckets` (several calls when there are many), at one watermark each."""
        snapshot = None
        for start in range(0, len(buckets), MAX_DETAIL_BUCKETS):
            part = self.index_digest(registration, buckets[start:start + MAX_DETAIL_BUCKETS])
            if snapshot is None:
                snapshot = part
            else:
                snapshot.entries.update(part.entries)
                snapshot.data_lsn = min(snapshot.data_lsn, part.data_lsn)
        return snapshot

    def reload(self, registration: Registration, *, model: bool, index: bool,
               timeout_s: float) -> ranker_pb2.ReloadResponse:
        try:
            return self._stub(registration.address).Reload(
                ranker_pb2.ReloadRequest(reload_model=model, resync_index=index), timeout=timeout_s)
        except grpc.RpcError as error:
            raise ReplicaUnreachable(f"{error.code().name}: {error.details()}") from None

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
