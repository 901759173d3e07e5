"""`Rollback(version)`: make an earlier published version current again.

The trainer's publish rules apply: the artifact is re-read and re-hashed first; `model/current`
is replaced by a compare-and-swap from the exact value read before (a concurrent publish or
rollback wins and is reported, never overwritten); the value written is the ModelPointer the
trainer published for that version (same bytes). model_versions records it: the version rolled
back from becomes 'rolled_back' (rolled_back_to, rolled_back_at), which the trainer's loop reads
so that it does not publish straight over the rollback (services/trainer/scheduler.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from services.common.artifacts import read_verified
from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from services.common.etcd import Etcd
from services.consistency.versions import PUBLISHED, ROLLED_BACK, ModelVersions
from services.contracts.etcd_keys import MODEL_CURRENT
from services.contracts.model_pointer import InvalidPointer, ModelPointer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RollbackResult:
    previous_version: int
    current_version: int
    sha256: str
    changed: bool


def verified_pointer(row: dict, artifact_engine=None) -> ModelPointer:
    """The pointer of a version whose artifact exists and re-hashes to its sha256."""
    version = int(row["version"])
    if not row.get("artifact_uri") or not row.get("sha256"):
        raise FailedPrecondition(f"version {version} has no artifact")
    try:
        read_verified(row["artifact_uri"], row["sha256"], artifact_engine)
    except Exception as error:  # noqa: BLE001 - missing, corrupt or unreadable: refuse alike
        raise FailedPrecondition(f"the artifact of version {version} fails verification: "
                                 f"{type(error).__name__}: {str(error)[:200]}") from None
    return ModelPointer(version=version, uri=row["artifact_uri"], sha256=row["sha256"],
                        data_lsn=int(row.get("lsn_to") or 0), metrics=row.get("metrics") or {})


class Rollbacks:
    def __init__(self, etcd: Etcd, versions: ModelVersions, artifact_engine=None) -> None:
        self.etcd, self.versions, self.artifact_engine = etcd, versions, artifact_engine

    def rollback(self, version: int, reason: str = "requested") -> RollbackResult:
        if version <= 0:
            raise InvalidArgument("version: must be a positive version number")
        row = self.versions.get(version)
        if row is None:
            raise NotFound(f"version {version} does not exist")
        if row["status"] not in (PUBLISHED, ROLLED_BACK):
            raise FailedPrecondition(f"version {version} was never published (status {row['status']!r})")
        pointer = verified_pointer(row, self.artifact_engine)
        kv = self.etcd.get(MODEL_CURRENT)
        previous = 0
        if kv is not None:
            try:
                previous = ModelPointer.from_json(kv.value).version
            except InvalidPointer:
                previous = 0
        if previous == version:
            return RollbackResult(previous, version, pointer.sha256, changed=False)
        if not self.etcd.compare_and_swap(MODEL_CURRENT, None if kv is None else kv.value, pointer.to_json()):
            raise Aborted(f"lost the race: model/current changed while rolling back to version {version}; "
                          "nothing was overwritten, check and retry")
        self.versions.record_rollback(previous, version, reason)
        log.warning("rolled back", extra={"from_version": previous, "to_version": version, "reason": reason})
        return RollbackResult(previous, version, pointer.sha256, changed=True)

    def rollback_to_last_good(self, below: int, reason: str) -> RollbackResult:
        """The newest version below `below` that was published and whose artifact verifies."""
        for row in self.versions.published_before(below):
            try:
                verified_pointer(row, self.artifact_engine)
            except FailedPrecondition:
                continue
            return self.rollback(int(row["version"]), reason)
        raise FailedPrecondition(f"no earlier published version with a valid artifact below {below}")
