"""Which model answers a request: the current version, or for a fixed share of users the canary.

Bundles become visible by replacing one reference (`ServingState.routing`). A request takes that
reference once and finishes on it, whatever is swapped meanwhile. A user's canary bucket is a
hash of the user id: the same users on every replica and for every canary.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from services.ranker.model_bundle import ModelBundle


def canary_bucket(user_id: str) -> float:
    """A user's fixed position in [0, 1): the same on every replica and for every canary."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


@dataclass(frozen=True)
class Routing:
    current: ModelBundle | None = None
    canary: ModelBundle | None = None
    canary_share: float = 0.0


class ServingState:
    """The one reference requests read (`routing`), plus what Status reports."""

    def __init__(self) -> None:
        self.routing = Routing()
        self.swaps = 0
        self.refused_version = 0
        self.refused_reason = ""
        self.refused_count = 0
        self._lock = threading.Lock()

    def route(self, user_id: str) -> tuple[ModelBundle | None, str]:
        routing = self.routing
        if (routing.canary is not None and routing.canary_share > 0.0 and user_id
                and canary_bucket(user_id) < routing.canary_share):
            return routing.canary, "canary"
        return routing.current, "current"

    @property
    def current(self) -> ModelBundle | None:
        return self.routing.current

    def install(self, current: ModelBundle | None, canary: ModelBundle | None, share: float) -> Routing:
        """Replaces the routing; returns the previous one (the caller releases what is unused)."""
        with self._lock:
            previous = self.routing
            self.routing = Routing(current, canary if share > 0 else None,
                                   share if canary is not None else 0.0)
            if previous.current is not current:
                self.swaps += 1
            return previous

    def refuse(self, version: int, reason: str) -> None:
        with self._lock:
            self.refused_version, self.refused_reason = version, reason
            self.refused_count += 1
