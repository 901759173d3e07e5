"""The model artifact: what the trainer publishes and rankers load.

One file of bytes (torch.save of plain containers and tensors, loaded back with
`weights_only=True`, so loading an artifact can never execute code), addressed by
URI in the artifact store and verified by its sha256 before it is deserialised.

Contents (format `deltarec-model/1`):
- `config`: ModelConfig as a dict; `state_dict`: the weights;
- `item_ids`: the learned id table, model index i <-> item_ids[i - 1] (index 0 = no learned id:
  items created after training are served through the text-only path);
- `item_vector_ids` / `item_vectors`: the item tower's output for every active item at training
  time ([n, dim] float32), so a replica can serve right after loading and verify its index;
- `popular_item_ids`: most popular items at training time (cold-start fallback);
- `version`, `parent_version`, `data_lsn`, `created_at`.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from services.model.network import DeltaRecModel, ModelConfig

FORMAT = "deltarec-model/1"


class ArtifactInvalid(Exception):
    """The bytes are not a usable artifact (wrong format, missing part, shapes that disagree)."""


@dataclass
class ModelArtifact:
    version: int
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    item_ids: list[str]
    item_vector_ids: list[str]
    item_vectors: np.ndarray
    data_lsn: int = 0
    parent_version: int = 0
    popular_item_ids: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)

    def build_model(self) -> DeltaRecModel:
        """The model in eval mode, weights loaded and shapes checked."""
        model = DeltaRecModel(self.config, num_items=len(self.item_ids))
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as error:
            raise ArtifactInvalid(f"weights do not fit the config: {str(error)[:300]}") from None
        model.eval()
        return model


def serialize(artifact: ModelArtifact) -> bytes:
    payload = {
        "format": FORMAT,
        "version": int(artifact.version),
        "parent_version": int(artifact.parent_version),
        "data_lsn": int(artifact.data_lsn),
        "created_at": float(artifact.created_at),
        "config": artifact.config.to_dict(),
        "state_dict": {name: tensor.detach().cpu().contiguous() for name, tensor in artifact.state_dict.items()},
        "item_ids": list(artifact.item_ids),
        "item_vector_ids": list(artifact.item_vector_ids),
        "item_vectors": torch.from_numpy(np.ascontiguousarray(artifact.item_vectors, dtype=np.float32)),
        "popular_item_ids": list(artifact.popular_item_ids),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def deserialize(data: bytes) -> ModelArtifact:
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad artifact
        raise ArtifactInvalid(f"not a readable artifact: {type(error).__name__}: {str(error)[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ArtifactInvalid(f"unknown artifact format {payload.get('format') if isinstance(payload, dict) else None!r}")
    try:
        config = ModelConfig.from_dict(payload["config"])
        vectors = payload["item_vectors"].numpy().astype(np.float32, copy=False)
        artifact = ModelArtifact(
            version=int(payload["version"]), config=config, state_dict=payload["state_dict"],
            item_ids=list(payload["item_ids"]), item_vector_ids=list(payload["item_vector_ids"]),
            item_vectors=vectors, data_lsn=int(payload["data_lsn"]),
            parent_version=int(payload["parent_version"]),
            popular_item_ids=list(payload["popular_item_ids"]), created_at=float(payload["created_at"]))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ArtifactInvalid(f"artifact is missing or has a bad part: {error}") from None
    if vectors.ndim != 2 or vectors.shape[0] != len(artifact.item_vector_ids) or vectors.shape[1] != config.dim:
        raise ArtifactInvalid(f"item_vectors shape {vectors.shape} does not match "
                              f"{len(artifact.item_vector_ids)} ids x dim {config.dim}")
    return artifact
