"""Hot swap: load a wanted version in the background and swap one reference.

`ModelManager` is told which versions (`ModelPointer`s) are wanted for `current` and `canary`
(by `EtcdModelWatcher`, model_watch.py; no etcd in here) and, in its loader thread, reads the
artifact (sha256 verified by the artifact store), deserialises it (weights-only, shape checks),
builds the model, checks it (finite weights, text_dim), builds the item index from the catalog,
warms it up and installs it. A failure refuses the version (Status, metric, log) and changes
nothing that is served. Wanted versions are coalesced: if v2 and v3 are published while v1
loads, only v3 is loaded next.

Promotion (the canary's version becomes `model/current`) reuses the canary bundle; abort
(`model/canary` deleted or share 0) drops it. Old bundles are detached from the catalog and
released, then the allocator is asked to return freed memory (swaps must not leak).
"""
from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from typing import Callable

from services.common.artifacts import ArtifactCorrupt, ArtifactMissing
from services.contracts.model_pointer import ModelPointer
from services.model.artifact import ArtifactInvalid, deserialize
from services.ranker import metrics
from services.ranker.catalog import Catalog
from services.ranker.index_structures import IndexOptions
from services.ranker.model_bundle import ModelBundle
from services.ranker.routing import Routing, ServingState

log = logging.getLogger(__name__)

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def release_memory() -> None:
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class Refused(Exception):
    """The artifact is unusable; `transient` ones are tried again later."""

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


class ModelManager:
    def __init__(self, catalog: Catalog, state: ServingState, read_artifact: Callable[[str, str], bytes],
                 index_options: IndexOptions | None = None, *, retry_s: float = 10.0,
                 on_change: Callable[[], None] | None = None) -> None:
        self.catalog, self.state = catalog, state
        self.read_artifact = read_artifact
        self.index_options = index_options
        self.retry_s = retry_s
        self.on_change = on_change
        self._lock = threading.Lock()
        self._wanted: dict[str, ModelPointer | None] = {"current": None, "canary": None}
        self._refused: dict[tuple[int, str], tuple[float, bool]] = {}   # (version, sha) -> (when, transient)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.idle = threading.Event()
        self.idle.set()
        self.loading: ModelPointer | None = None

    # ------------------------------------------------------------------ inputs (any thread)
    def want(self, role: str, spec: ModelPointer | None) -> None:
        with self._lock:
            if self._wanted.get(role) == spec:
                return
            self._wanted[role] = spec
            self.idle.clear()
        self._wake.set()

    def forget_refusals(self) -> None:
        """Lets refused artifacts be tried again at once (a repair: the artifact may be fixed)."""
        with self._lock:
            self._refused.clear()
            self.idle.clear()
        self._wake.set()

    def wanted(self, role: str) -> ModelPointer | None:
        return self._wanted.get(role)

    # ------------------------------------------------------------------ loop
    def start(self) -> "ModelManager":
        self._thread = threading.Thread(target=self._run, name="model-loader", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        trim_at = None
        while not self._stop.is_set():
            timeout = (self.retry_s if trim_at is None
                       else max(0.0, min(self.retry_s, trim_at - time.monotonic())))
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.process_once():
                    # The frame that referenced the old bundles is gone: free them now, and once
                    # more a little later for bundles that in-flight requests still held.
                    release_memory()
                    trim_at = time.monotonic() + 2.0
                elif trim_at is not None and time.monotonic() >= trim_at:
                    release_memory()
                    trim_at = None
            except Exception:  # noqa: BLE001 - the loader must survive anything
                log.exception("model loader step failed")

    def process_once(self) -> bool:
        """Brings the routing to what is wanted (synchronous; the loop calls it). True when
        bundles were dropped (call `release_memory()` once the caller's references are gone)."""
        with self._lock:
            want_current, want_canary = self._wanted["current"], self._wanted["canary"]
        routing = self.state.routing
        loaded: list[ModelBundle] = [b for b in (routing.current, routing.canary) if b is not None]

        def find(spec: ModelPointer) -> ModelBundle | None:
            return next((b for b in loaded if spec.same_artifact(b.spec)), None)

        current = routing.current
        if want_current is not None and not want_current.same_artifact(current.spec if current else None):
            candidate = find(want_current) or self._try_load(want_current, "current")
            if candidate is not None:
                current = candidate
                loaded.append(candidate)
        canary, share = None, 0.0
        if (want_canary is not None and want_canary.share > 0
                and not want_canary.same_artifact(current.spec if current else None)):
            canary = find(want_canary) or self._try_load(want_canary, "canary")
            share = want_canary.share if canary is not None else 0.0
        if current is routing.current and canary is routing.canary and share == routing.canary_share:
            self._settle()
            return False
        previous = self.state.install(current, canary, share)
        self._publish_metrics()
        dropped = self._detach_dropped(previous, self.state.routing)
        if previous.current is not current:
            metrics.SWAPS.inc()
            log.info("model swapped", extra={
                "model_version": current.version if current else 0,
                "previous_version": previous.current.version if previous.current else 0})
        if (canary is not previous.canary) or share != previous.canary_share:
            log.info("canary set", extra={"canary_version": canary.version if canary else 0, "share": share})
        if self.on_change:
            self.on_change()
        self._settle()
        return dropped

    def _settle(self) -> None:
        with self._lock:
            pending = any(spec is not None and self._needs_work(role, spec)
                          for role, spec in self._wanted.items())
            if not pending:
                self.idle.set()

    def _needs_work(self, role: str, spec: ModelPointer) -> bool:
        routing = self.state.routing
        served = routing.current if role == "current" else routing.canary
        current_spec = routing.current.spec if routing.current else None
        if role == "canary" and (spec.share <= 0 or spec.same_artifact(current_spec)):
            return routing.canary is not None
        if served is not None and spec.same_artifact(served.spec):
            return False
        refused = self._refused.get((spec.version, spec.sha256))
        return refused is None or refused[1]

    @staticmethod
    def _detach_dropped(previous: Routing, now: Routing) -> bool:
        keep = {id(b) for b in (now.current, now.canary) if b is not None}
        dropped = [b for b in (previous.current, previous.canary) if b is not None and id(b) not in keep]
        for bundle in dropped:
            bundle.detach()
        return bool(dropped)

    def _publish_metrics(self) -> None:
        routing = self.state.routing
        metrics.MODEL_VERSION.labels("current").set(routing.current.version if routing.current else 0)
        metrics.MODEL_VERSION.labels("canary").set(routing.canary.version if routing.canary else 0)
        metrics.CANARY_SHARE.set(routing.canary_share if routing.canary else 0.0)

    # ------------------------------------------------------------------ loading
    def _try_load(self, spec: ModelPointer, role: str) -> ModelBundle | None:
        key = (spec.version, spec.sha256)
        refused = self._refused.get(key)
        if refused is not None and (not refused[1] or time.monotonic() - refused[0] < self.retry_s):
            return None
        self.loading = spec
        started = time.monotonic()
        try:
            bundle = self.load(spec)
        except Refused as refusal:
            self._refused[key] = (time.monotonic(), refusal.transient)
            self.state.refuse(spec.version, str(refusal))
            metrics.REFUSED.labels("transient" if refusal.transient else "invalid").inc()
            log.error("model artifact refused; still serving the previous version",
                      extra={"role": role, "model_version": spec.version, "reason": str(refusal),
                             "transient": refusal.transient})
            return None
        finally:
            self.loading = None
        self._refused.pop(key, None)
        metrics.SWAP_SECONDS.observe(time.monotonic() - started)
        log.info("model loaded", extra={"role": role, "model_version": spec.version,
                                        "items": bundle.index.size,
                                        "seconds": round(time.monotonic() - started, 3)})
        return bundle

    def load(self, spec: ModelPointer) -> ModelBundle:
        """Read, verify, build, check and warm up one version (raises Refused)."""
        try:
            data = self.read_artifact(spec.uri, spec.sha256)
        except ArtifactCorrupt as error:
            raise Refused(f"checksum mismatch: {error}") from None
        except ArtifactMissing as error:
            raise Refused(f"artifact missing: {error}", transient=True) from None
        except (OSError, ValueError) as error:
            raise Refused(f"artifact unreadable: {error}", transient=True) from None
        except Exception as error:  # noqa: BLE001 - e.g. the database of a postgres:// store is down
            raise Refused(f"artifact store error: {type(error).__name__}: {str(error)[:200]}",
                          transient=True) from None
        bundle = None
        try:
            artifact = deserialize(data)
            del data
            if artifact.version != spec.version:
                raise ArtifactInvalid(f"artifact says version {artifact.version}, etcd says {spec.version}")
            model = artifact.build_model()
            bundle = ModelBundle(artifact, spec, model, self.catalog, self.index_options)
            bundle.build_index(reuse_graph_of=self.state.routing.current)
            bundle.warm_up()
            agreement = bundle.artifact_agreement(artifact)
            if agreement is not None:
                log.info("artifact item vectors reproduced", extra={"model_version": spec.version,
                                                                     "agreement": round(agreement, 3)})
            return bundle
        except ArtifactInvalid as error:
            if bundle is not None:
                bundle.detach()
            raise Refused(f"invalid artifact: {error}") from None
        except Exception as error:  # noqa: BLE001 - anything else in a load is a refusal too
            if bundle is not None:
                bundle.detach()
            log.exception("model load failed")
            raise Refused(f"load failed: {type(error).__name__}: {str(error)[:200]}") from None
