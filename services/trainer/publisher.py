"""Artifacts to the store, versions to etcd `model/current` (or `model/canary`).

The artifact is written first (content-addressed name, sha256 returned by the store), then
`{version, uri, sha256, data_lsn, metrics}` goes to `model/current` in an etcd transaction that
compares the key with the exact value the run started from. Outcomes:

* the compare holds: published;
* the key already holds THIS version (a previous attempt published and crashed before recording
  it): published, nothing written again (idempotent);
* anything else (another trainer, a rollback, a newer version): the race is lost and reported;
  the value in etcd is never overwritten.

With TRAINER_PUBLISH_AS=canary a version goes to `model/canary` instead (`publish_canary`): one
etcd transaction that compares `model/current` with the value the run was gated against AND
`model/canary` with the value just read, and puts the canary pointer (with its `share`). A canary
already in flight (model/canary holding another version with a share > 0) is never replaced: its
evidence would be thrown away, and a trainer that updates every few minutes would keep any canary
from ever collecting enough impressions to be decided. The candidate is then not published
(`PublishResult.canary_busy`); a model/canary with share 0 means "no canary" and may be replaced.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from services.common.artifacts import ArtifactStore, sha256_hex
from services.common.etcd import Etcd
from services.contracts.etcd_keys import MODEL_CANARY, MODEL_CURRENT
from services.contracts.model_pointer import InvalidPointer, ModelPointer
from services.model.artifact import ModelArtifact, serialize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Current:
    """`model/current` as read: the exact bytes (the compare of the next CAS) and their meaning
    (None when the key is absent or holds something that is not a model pointer)."""
    raw: bytes | None
    pointer: ModelPointer | None

    @property
    def version(self) -> int:
        return self.pointer.version if self.pointer else 0

    @property
    def data_lsn(self) -> int:
        return self.pointer.data_lsn if self.pointer else 0


@dataclass(frozen=True)
class PublishResult:
    published: bool
    reason: str
    current: Current
    already: bool = False     # this version was already current (or the canary): nothing was written
    canary_busy: int = 0      # publish_canary: the undecided canary version that was not replaced


def artifact_name(version: int, sha256: str) -> str:
    """Content-addressed: two attempts, two databases or two clusters never share a name."""
    return f"model-v{version:06d}-{sha256[:16]}.pt"


class Publisher:
    def __init__(self, etcd: Etcd, store: ArtifactStore) -> None:
        self.etcd, self.store = etcd, store

    def current(self) -> Current:
        kv = self.etcd.get(MODEL_CURRENT)
        if kv is None:
            return Current(None, None)
        try:
            pointer = ModelPointer.from_json(kv.value)
        except InvalidPointer as error:
            log.warning("model/current holds no usable pointer", extra={"error": str(error)})
            pointer = None
        return Current(kv.value, pointer)

    def store_artifact(self, artifact: ModelArtifact) -> tuple[str, str]:
        data = serialize(artifact)
        uri, digest = self.store.write(artifact_name(artifact.version, sha256_hex(data)), data)
        return uri, digest

    def publish(self, *, version: int, uri: str, sha256: str, data_lsn: int, metrics: dict,
                expected: bytes | None) -> PublishResult:
        """CAS `model/current` from `expected` (None: the key must not exist)."""
        pointer = ModelPointer(version=int(version), uri=uri, sha256=sha256, data_lsn=int(data_lsn),
                               metrics=metrics)
        value = pointer.to_json()
        if self.etcd.compare_and_swap(MODEL_CURRENT, expected, value):
            log.info("published", extra={"version": version, "uri": uri, "sha256": sha256, "data_lsn": data_lsn})
            return PublishResult(True, f"published as model/current (data_lsn {data_lsn})", Current(value, pointer))
        now = self.current()
        if now.version == version:
            return PublishResult(True, "already model/current (an earlier attempt published it)", now, already=True)
        reason = (f"lost the publish race: model/current changed to version {now.version} "
                  f"since this run started (expected version {_version_of(expected)})")
        log.warning("publish refused: stale", extra={"version": version, "current_version": now.version})
        return PublishResult(False, reason, now)


    def canary(self) -> Current:
        """`model/canary` as read (pointer None: absent or not a model pointer)."""
        kv = self.etcd.get(MODEL_CANARY)
        if kv is None:
            return Current(None, None)
        try:
            pointer = ModelPointer.from_json(kv.value, canary=True)
        except InvalidPointer as error:
            log.warning("model/canary holds no usable pointer", extra={"error": str(error)})
            pointer = None
        return Current(kv.value, pointer)

    def publish_canary(self, *, version: int, uri: str, sha256: str, data_lsn: int, metrics: dict, share: float,
                       expected_current: bytes | None) -> PublishResult:
        """Puts `model/canary` (share `share`) if `model/current` still holds `expected_current`
        and no other canary is in flight (see the module docstring). `PublishResult.current` is
        then the canary as written."""
        pointer = ModelPointer(version=int(version), uri=uri, sha256=sha256, data_lsn=int(data_lsn),
                               share=float(share), metrics=metrics)
        value = pointer.to_json(canary=True)
        for _ in range(3):      # a transaction lost to a change of model/canary alone: judge the new value
            canary = self.canary()
            if canary.pointer is not None and canary.pointer.version == version:
                return PublishResult(True, "already model/canary (an earlier attempt published it)", canary,
                                     already=True)
            if canary.pointer is not None and canary.pointer.share > 0:
                return PublishResult(False, f"not published: canary version {canary.pointer.version} (share "
                                            f"{canary.pointer.share:g}) is undecided and is not replaced",
                                     canary, canary_busy=canary.pointer.version)
            if self.etcd.transaction([(MODEL_CURRENT, expected_current), (MODEL_CANARY, canary.raw)],
                                     [("put", MODEL_CANARY, value)]):
                log.info("published as canary", extra={"version": version, "share": share, "uri": uri,
                                                       "data_lsn": data_lsn})
                return PublishResult(True, f"published as model/canary, share {share:g} (data_lsn {data_lsn})",
                                     Current(value, pointer))
            now = self.current()
            if now.raw != expected_current:
                reason = (f"lost the publish race: model/current changed to version {now.version} "
                          f"since this run started (expected version {_version_of(expected_current)})")
                log.warning("canary publish refused: stale", extra={"version": version,
                                                                    "current_version": now.version})
                return PublishResult(False, reason, now)
        return PublishResult(False, "lost the publish race: model/canary kept changing", self.canary())


def _version_of(raw: bytes | None) -> int:
    if raw is None:
        return 0
    try:
        return ModelPointer.from_json(raw).version
    except InvalidPointer:
        return 0
