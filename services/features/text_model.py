"""The text model (MiniLM), loaded in the background so that a (re)started features service
applies events and serves reads before it is there.

Why: importing torch and loading MiniLM takes seconds on an idle machine and tens of them on a
loaded one (through transformers: 21 s measured in a fault drill; `load_minilm` skips
transformers, see services/common/minilm_torch.py), and a killed features service used to be
down for all of it although events, user state, item reads and the change feeds need no model. Only two things do: item text
to embed (catalog changes, Resync) and EmbedText. So the load runs on a thread of its own, the
service is SERVING as soon as its store is reachable and its consumer started, and:

- `encode` (bulk: the applier's item vectors) waits for the model. A batch holding item text to
  embed therefore waits whole — the delta stream keeps its commit order and nothing unapplied is
  acknowledged — while batches of events (the steady stream) apply at once.
- queries (EmbedText) never wait: `require_ready` raises `ModelLoading` (UNAVAILABLE) until it
  is there.
- `fallback_vector` (unusable text) is a hash: no model needed.

A load that fails (files missing, out of memory) is logged and retried with backoff; Status says
which state the model is in (`loading`, `ready`, `failed: ...`), and a batch waiting for it makes
the delta stream stall, which the readiness check reports after STALL_AFTER_S — the honest
signal when item vectors cannot be computed.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol, Sequence

import numpy as np
from prometheus_client import Gauge

from services.common.errors import Unavailable
from services.common.text_encoder import MINILM_DIM, MINILM_MODEL_NAME, hashed_unit_vector

log = logging.getLogger(__name__)

MODEL_READY = Gauge("deltarec_features_text_model_ready", "1 once the text model is loaded")
MODEL_LOAD_SECONDS = Gauge("deltarec_features_text_model_load_seconds", "seconds the text model took to load")


class Encoder(Protocol):
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray: ...


class ModelLoading(Unavailable):
    """The text model is not loaded yet (UNAVAILABLE: retry shortly)."""


class ModelClosed(RuntimeError):
    pass


class TextModel:
    """The embedding model behind a load that runs in the background (`start`)."""

    def __init__(self, load: Callable[[], Encoder], *, model_name: str = MINILM_MODEL_NAME,
                 dim: int = MINILM_DIM, retry_s: float = 5.0) -> None:
        self._load, self.model_name, self.dim, self.retry_s = load, model_name, dim, retry_s
        self._encoder: Encoder | None = None
        self._condition = threading.Condition()
        self._closed = False
        self.error: str | None = None
        self.load_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="text-model-load", daemon=True)
        MODEL_READY.set(0)

    def start(self) -> "TextModel":
        self._thread.start()
        return self

    # ------------------------------------------------------------------ state
    @property
    def ready(self) -> bool:
        return self._encoder is not None

    @property
    def state(self) -> str:
        if self._encoder is not None:
            return "ready"
        return f"failed: {self.error}" if self.error else "loading"

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        with self._condition:
            self._condition.wait_for(lambda: self._encoder is not None or self._closed, timeout_s)
            return self._encoder is not None

    # ------------------------------------------------------------------ embedding
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Bulk texts: waits until the model is loaded (or the service closes)."""
        encoder = self._encoder
        if encoder is None:
            with self._condition:
                self._condition.wait_for(lambda: self._encoder is not None or self._closed)
                if self._encoder is None:
                    raise ModelClosed("text model closed before it was loaded")
                encoder = self._encoder
        return encoder.encode(texts, batch_size=len(texts))

    def require_ready(self) -> None:
        """ModelLoading (UNAVAILABLE) unless the model is loaded: for queries, which must not
        wait behind bulk work that waits for the model."""
        if self._encoder is None:
            raise ModelLoading(f"the text model is {self.state[:200]}; retry shortly")

    def fallback_vector(self, key: str) -> np.ndarray:
        return hashed_unit_vector(key, self.dim)

    # ------------------------------------------------------------------ the load
    def _run(self) -> None:
        backoff = self.retry_s
        while not self._closed:
            started = time.monotonic()
            try:
                encoder = self._load()
            except Exception as error:  # noqa: BLE001 - reported in Status and retried
                repeated = self.error is not None
                self.error = f"{type(error).__name__}: {error}"[:300]
                # A server fault: ERROR the first time, WARNING for the retries that follow.
                (log.warning if repeated else log.error)(
                    "text model failed to load; retrying", extra={"error": self.error, "retry_s": backoff})
                with self._condition:
                    self._condition.wait_for(lambda: self._closed, backoff)
                backoff = min(backoff * 2, 120.0)
                continue
            self.load_seconds = time.monotonic() - started
            with self._condition:
                self._encoder, self.error = encoder, None
                self._condition.notify_all()
            MODEL_READY.set(1)
            MODEL_LOAD_SECONDS.set(self.load_seconds)
            log.info("model loaded", extra={"model": self.model_name, "dim": self.dim,
                                            "load_s": round(self.load_seconds, 2)})
            return

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()


def load_minilm(torch_threads: int) -> Encoder:
    """Imports torch and loads MiniLM, evaluated in plain torch (services/common/minilm_torch.py:
    the same vectors as through transformers, whose import dominated the load). The model's files
    are looked for first: a missing model fails at once, not after the import."""
    from services.common.text_encoder import locate_minilm_dir
    model_dir = locate_minilm_dir()
    import torch
    torch.set_num_threads(torch_threads)
    from services.common.minilm_torch import TorchMiniLM
    return TorchMiniLM(model_dir, num_threads=torch_threads)
