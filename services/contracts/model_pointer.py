"""The value of etcd `model/current` and `model/canary`: which artifact to serve.

JSON object, keys sorted:

    {"version": 7, "uri": "file:///.../model-v000007-<sha16>.pt", "sha256": "<64 hex>",
     "data_lsn": 123456, "metrics": {...}}                       # model/current
    {... same keys ..., "share": 0.2}                            # model/canary

* `version` (> 0) is the `model_versions` row; the artifact itself carries the same number.
* `uri` + `sha256` name the artifact; readers verify the digest before loading it.
* `data_lsn`: the delta-stream position the model was trained up to.
* `metrics`: the evaluation that let it through the gate (informative only).
* `share` (canary only): the fraction of users, in [0, 1], routed to the canary.

The trainer's publisher writes it (`to_json`) by compare-and-swap; the ranker's hot swap and the
consistency checks parse it (`from_json`), which refuses anything malformed with `InvalidPointer`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_SHA256 = re.compile(r"[0-9a-f]{64}")


class InvalidPointer(ValueError):
    """The value in etcd is not a usable model pointer; the message says which field is wrong."""


@dataclass(frozen=True)
class ModelPointer:
    version: int
    uri: str
    sha256: str
    data_lsn: int = 0
    share: float = 0.0        # canary only
    metrics: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version <= 0:
            raise InvalidPointer(f"version: must be a positive integer, got {self.version!r}")
        if not isinstance(self.uri, str) or not self.uri:
            raise InvalidPointer("uri: required")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise InvalidPointer(f"sha256: must be 64 lowercase hex digits, got {str(self.sha256)[:80]!r}")
        if isinstance(self.data_lsn, bool) or not isinstance(self.data_lsn, int) or self.data_lsn < 0:
            raise InvalidPointer(f"data_lsn: must be a non-negative integer, got {self.data_lsn!r}")
        if not isinstance(self.share, (int, float)) or not 0.0 <= float(self.share) <= 1.0:
            raise InvalidPointer(f"share: must be within [0, 1], got {self.share!r}")
        if not isinstance(self.metrics, dict):
            raise InvalidPointer("metrics: must be a JSON object")

    # ------------------------------------------------------------------ writing
    def to_dict(self, *, canary: bool = False) -> dict:
        value = {"version": self.version, "uri": self.uri, "sha256": self.sha256,
                 "data_lsn": self.data_lsn, "metrics": self.metrics}
        if canary:
            value["share"] = float(self.share)
        return value

    def to_json(self, *, canary: bool = False) -> bytes:
        """The exact bytes written to etcd (keys sorted: a compare-and-swap compares bytes)."""
        return json.dumps(self.to_dict(canary=canary), sort_keys=True).encode()

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_json(cls, value: bytes | str | dict, *, canary: bool = False) -> "ModelPointer":
        """Parses and validates a value read from etcd. `share` is read only for `model/canary`
        (a share in `model/current` means nothing and is ignored)."""
        if isinstance(value, (bytes, str)):
            try:
                value = json.loads(value)
            except ValueError as error:
                raise InvalidPointer(f"not JSON: {error}") from None
        if not isinstance(value, dict):
            raise InvalidPointer("not a JSON object")
        missing = [name for name in ("version", "uri", "sha256") if name not in value]
        if missing:
            raise InvalidPointer(f"{missing[0]}: required")
        try:
            version = _integer(value["version"], "version")
            data_lsn = _integer(value.get("data_lsn") or 0, "data_lsn")
            share = float(value.get("share") or 0.0) if canary else 0.0
        except (TypeError, ValueError) as error:
            raise InvalidPointer(str(error)) from None
        return cls(version=version, uri=str(value["uri"]), sha256=str(value["sha256"]), data_lsn=data_lsn,
                   share=share, metrics=value.get("metrics") or {})

    def same_artifact(self, other: "ModelPointer | None") -> bool:
        return other is not None and other.version == self.version and other.sha256 == self.sha256


def _integer(raw: object, name: str) -> int:
    if isinstance(raw, bool):
        raise ValueError(f"{name}: must be an integer, got {raw!r}")
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError(f"{name}: must be an integer, got {raw!r}")
        return int(raw)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be an integer, got {str(raw)[:80]!r}") from None
