"""Helpers for tests and benchmarks: build a model artifact the way the trainer does and publish
it the way the trainer does (artifact store + `model/current` in etcd). Not used when serving."""
from __future__ import annotations

import time

import numpy as np
import torch

from services.common.artifacts import ArtifactStore
from services.common.text_encoder import hashed_unit_vector
from services.trainer.artifact import ModelArtifact, serialize
from services.trainer.model import DeltaRecModel, ModelConfig


def text_vectors(keys: list[str], dim: int = 384) -> np.ndarray:
    """Deterministic unit vectors standing in for MiniLM embeddings."""
    return np.stack([hashed_unit_vector(key, dim) for key in keys]) if keys else np.zeros((0, dim), np.float32)


def make_artifact(version: int, item_ids: list[str], item_text: np.ndarray, *, dim: int = 32,
                  max_len: int = 20, seed: int | None = None, popular: list[str] | None = None,
                  data_lsn: int = 0, parent_version: int = 0, extra_ids: int = 0) -> ModelArtifact:
    """An untrained (randomly initialised, seeded) model over `item_ids`, with their item vectors.
    `extra_ids` more rows in the id table (items no longer in the catalog: a bigger model)."""
    torch.manual_seed(version if seed is None else seed)
    config = ModelConfig(dim=dim, num_layers=1, num_heads=2, max_len=max_len, dropout=0.0)
    model = DeltaRecModel(config, num_items=len(item_ids) + extra_ids).eval()
    with torch.inference_mode():
        indexes = torch.arange(1, len(item_ids) + 1)
        vectors = model.item_vectors(indexes, torch.from_numpy(np.asarray(item_text, np.float32)),
                                     apply_id_dropout=False).numpy() if item_ids else np.zeros((0, dim), np.float32)
    return ModelArtifact(version=version, config=config,
                         state_dict={k: v.clone() for k, v in model.state_dict().items()},
                         item_ids=list(item_ids) + [f"retired-{n}" for n in range(extra_ids)],
                         item_vector_ids=list(item_ids),
                         item_vectors=np.asarray(vectors, np.float32), data_lsn=data_lsn,
                         parent_version=parent_version,
                         popular_item_ids=list(popular if popular is not None else item_ids[:50]),
                         created_at=time.time())


def store_artifact(store: ArtifactStore, artifact: ModelArtifact, name: str | None = None) -> dict:
    """Writes the artifact; returns the etcd spec {version, uri, sha256, data_lsn, metrics}."""
    uri, sha = store.write(name or f"model-v{artifact.version}.pt", serialize(artifact))
    return {"version": artifact.version, "uri": uri, "sha256": sha, "data_lsn": artifact.data_lsn, "metrics": {}}


def publish(etcd, spec: dict, key: str = "model/current") -> None:
    """Publishes like the trainer: compare-and-swap against the value read just before."""
    while True:
        current = etcd.get(key)
        if etcd.compare_and_swap(key, None if current is None else current.value, spec):
            return
