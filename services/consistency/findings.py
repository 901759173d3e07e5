"""What a check reports: findings with a severity, the replicas' states, digest summaries."""
from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field

# Names of the checks (Finding.check and CheckRequest.checks).
MODEL_VERSION = "model_version"
ARTIFACT = "artifact"
CATALOG_FEATURES = "catalog_features"
FEATURES_INDEX = "features_index"
USER_EVENTS = "user_events"
TRAINER_EVENTS = "trainer_events"
REPLICATION = "replication"
WATERMARK = "watermark"
ALL_CHECKS = (MODEL_VERSION, ARTIFACT, CATALOG_FEATURES, FEATURES_INDEX, USER_EVENTS, TRAINER_EVENTS,
              REPLICATION, WATERMARK)

MAX_KEYS = 100


class Severity(enum.IntEnum):
    """Numbers as in deltarec.v1.Severity."""
    OK = 1
    WARNING = 2
    ERROR = 3


@dataclass
class Finding:
    check: str
    severity: Severity
    subject: str
    detail: str
    repairable: bool = False
    keys: list[str] = field(default_factory=list)
    key_count: int = 0
    lsn_from: int = 0
    lsn_to: int = 0
    model_version: int = 0
    # What Reconcile does about it (e.g. "resync_items", "rebuild_users", "reload_model"), and
    # where (a replica address); not on the wire.
    repair: str = ""
    target: str = ""

    def __post_init__(self) -> None:
        self.key_count = self.key_count or len(self.keys)
        self.keys = sorted(self.keys)
        self.severity = Severity(self.severity)

    @property
    def bad(self) -> bool:
        return self.severity >= Severity.WARNING

    def to_dict(self) -> dict:
        value = asdict(self)
        value["severity"] = self.severity.name.lower()
        value["keys"] = self.keys[:MAX_KEYS]
        return value


@dataclass
class ReplicaState:
    replica_id: str
    address: str = ""
    model_version: int = 0
    model_sha256: str = ""
    data_lsn: int = 0
    index_size: int = 0
    index_checksum: str = ""
    canary_version: int = 0
    answering: bool = False
    index_digest: str = ""


@dataclass
class DigestSummary:
    kind: str
    side: str
    rows: int
    buckets: int
    root: str
    differing_buckets: int = 0
    rows_read: int = 0
    seconds: float = 0.0


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    replicas: list[ReplicaState] = field(default_factory=list)
    digests: list[DigestSummary] = field(default_factory=list)
    current_version: int = 0
    canary_version: int = 0
    watermark: int = 0
    checked_at: float = field(default_factory=time.time)
    seconds: float = 0.0
    source_root: str = ""
    feature_store_root: str = ""

    @property
    def consistent(self) -> bool:
        """True only when no finding is a warning or an error."""
        return not any(finding.bad for finding in self.findings)

    def add(self, finding: Finding) -> Finding:
        self.findings.append(finding)
        return finding

    def bad_findings(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.bad]

    def summary(self) -> str:
        bad = self.bad_findings()
        if not bad:
            return f"consistent at LSN {self.watermark} ({len(self.findings)} notes)"
        counts = {}
        for finding in bad:
            counts[finding.check] = counts.get(finding.check, 0) + 1
        return (f"{len(bad)} finding(s) at LSN {self.watermark}: "
                + ", ".join(f"{check} {n}" for check, n in sorted(counts.items())))

    def to_dict(self) -> dict:
        return {"consistent": self.consistent, "watermark": self.watermark,
                "current_version": self.current_version, "canary_version": self.canary_version,
                "findings": [f.to_dict() for f in self.findings],
                "replicas": [asdict(r) for r in self.replicas], "digests": [asdict(d) for d in self.digests],
                "seconds": round(self.seconds, 3)}


def plain_words(finding: Finding) -> str:
    """One line a person can act on."""
    mark = {Severity.OK: "ok", Severity.WARNING: "WARNING", Severity.ERROR: "ERROR"}[finding.severity]
    extra = ""
    if finding.keys:
        shown = ", ".join(finding.keys[:5])
        more = f" and {finding.key_count - 5} more" if finding.key_count > 5 else ""
        extra = f" [{shown}{more}]"
    return f"{mark:7} {finding.check}: {finding.detail}{extra}"
