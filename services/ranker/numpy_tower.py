"""The user tower for one user, in numpy: the serving kernel of DeltaRecModel.user_vector.

At batch size 1 (one Recommend = one user) eager torch spends most of its time in per-op and
per-module dispatch: ~0.85 ms for the 2-layer, dim-64 tower, against ~0.1 ms for the same
arithmetic in numpy. `NumpyUserTower` computes exactly what `DeltaRecModel.user_vector` computes
for one unpadded history in eval mode (pre-LN causal blocks, recency-bucket attention bias,
GELU feed-forward, final LayerNorm on the last position), reading the weights of the loaded
model. Only the last position is needed from the last block, so that block runs attention and
feed-forward for one query row.

It is used only after `matches()` confirmed, at load time and on histories of several lengths,
that it reproduces the torch model (max abs difference <= 1e-4); a model whose structure it does
not know (another architecture, a different state dict) is served by the torch path instead.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from scipy.special import erf

from services.model.network import NUM_RECENCY_BUCKETS, RECENCY_BUCKET_EDGES_SECONDS, DeltaRecModel

log = logging.getLogger(__name__)

_MASKED = -1e9
_SQRT_HALF = 1.0 / math.sqrt(2.0)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    inverse_dim = 1.0 / x.shape[-1]
    centered = x - x.sum(axis=-1, keepdims=True) * inverse_dim
    variance = np.einsum("...i,...i->...", centered, centered)[..., None] * inverse_dim
    centered *= weight / np.sqrt(variance + eps)
    centered += bias
    return centered


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x * _SQRT_HALF))


class NumpyUserTower:
    def __init__(self, model: DeltaRecModel) -> None:
        def array(tensor: torch.Tensor) -> np.ndarray:
            return tensor.detach().cpu().numpy().astype(np.float32, copy=True)

        config = model.config
        self.dim, self.heads = config.dim, config.num_heads
        self.head_dim = self.dim // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.edges = np.asarray(RECENCY_BUCKET_EDGES_SECONDS, np.float32)
        self.event_embedding = array(model.event_embedding.weight)
        # [layers, buckets, heads] with the causal mask as an extra bucket (index NUM_RECENCY_BUCKETS)
        table = array(model.recency_bias.weight).reshape(config.num_layers, NUM_RECENCY_BUCKETS, self.heads)
        self.bias_tables = np.concatenate(
            [table, np.full((config.num_layers, 1, self.heads), _MASKED, np.float32)], axis=1)
        self._future: dict[int, np.ndarray] = {}
        self.empty = array(model.empty_history_vector)
        norm = model.output_norm
        self.output_norm = (array(norm.weight), array(norm.bias), norm.eps)
        self.blocks = []
        for block in model.blocks:
            feed_forward = block.feed_forward
            if not (isinstance(feed_forward[1], torch.nn.GELU) and feed_forward[1].approximate == "none"):
                raise ValueError("unknown feed-forward activation")
            self.blocks.append({
                "norm1": (array(block.attention_norm.weight), array(block.attention_norm.bias),
                          block.attention_norm.eps),
                "qkv_w": np.ascontiguousarray(array(block.query_key_value.weight).T),
                "qkv_b": array(block.query_key_value.bias),
                "out_w": np.ascontiguousarray(array(block.attention_output.weight).T),
                "out_b": array(block.attention_output.bias),
                "norm2": (array(block.feed_forward_norm.weight), array(block.feed_forward_norm.bias),
                          block.feed_forward_norm.eps),
                "ff1_w": np.ascontiguousarray(array(feed_forward[0].weight).T),
                "ff1_b": array(feed_forward[0].bias),
                "ff2_w": np.ascontiguousarray(array(feed_forward[3].weight).T),
                "ff2_b": array(feed_forward[3].bias),
            })

    def __call__(self, history_vectors: np.ndarray, events: np.ndarray, ages: np.ndarray) -> np.ndarray:
        """history_vectors [t, dim], events [t], ages [t] (seconds before now, oldest first) -> [dim]."""
        length = history_vectors.shape[0]
        if length == 0:
            return self.empty.copy()
        heads, head_dim = self.heads, self.head_dim
        hidden = history_vectors + self.event_embedding[events]
        ages = np.asarray(ages, np.float32)
        query_ages = np.empty_like(ages)
        query_ages[:-1] = ages[1:]
        query_ages[-1] = 0.0
        elapsed = np.maximum(ages[None, :] - query_ages[:, None], 0.0)      # [query j, key i]
        buckets = np.searchsorted(self.edges, elapsed, side="left")          # = torch.bucketize
        future = self._future.get(length)
        if future is None:
            future = self._future[length] = np.triu(np.ones((length, length), bool), 1)
        buckets[future] = NUM_RECENCY_BUCKETS                                # the masked bucket
        last_block = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            rows = slice(length - 1, length) if layer == last_block else slice(0, length)
            bias = self.bias_tables[layer][buckets[rows]].transpose(2, 0, 1)   # [heads, q, t]
            qkv = _layer_norm(hidden, *block["norm1"]) @ block["qkv_w"] + block["qkv_b"]   # [t, 3 dim]
            qkv = qkv.reshape(length, 3, heads, head_dim).transpose(1, 2, 0, 3)          # [3, heads, t, hd]
            query = qkv[0][:, rows]                                                       # [heads, q, hd]
            scores = query @ qkv[1].transpose(0, 2, 1) * self.scale + bias               # [heads, q, t]
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            attended = (scores @ qkv[2]).transpose(1, 0, 2).reshape(-1, self.dim)        # [q, dim]
            hidden = hidden[rows] + attended @ block["out_w"] + block["out_b"]
            inner = _gelu(_layer_norm(hidden, *block["norm2"]) @ block["ff1_w"] + block["ff1_b"])
            hidden = hidden + inner @ block["ff2_w"] + block["ff2_b"]
        return _layer_norm(hidden[-1], *self.output_norm).astype(np.float32)

    def matches(self, model: DeltaRecModel, tolerance: float = 1e-4, seed: int = 0) -> float | None:
        """Max abs difference to the torch model over random histories (None = not comparable)."""
        rng = np.random.default_rng(seed)
        worst = 0.0
        for length in sorted({1, 2, 7, model.config.max_len}):
            vectors = rng.standard_normal((length, self.dim)).astype(np.float32) * 0.3
            events = rng.integers(1, 5, length)
            ages = np.sort(rng.uniform(0, 90 * 86400.0, length).astype(np.float32))[::-1].copy()
            with torch.inference_mode():
                expected = model.user_vector(
                    torch.ones((1, length), dtype=torch.long), torch.from_numpy(events).view(1, length),
                    torch.from_numpy(ages).view(1, length),
                    history_item_vectors=torch.from_numpy(vectors).view(1, length, self.dim))[0].numpy()
            got = self(vectors, events, ages)
            if got.shape != expected.shape:
                return None
            worst = max(worst, float(np.abs(got - expected).max()))
        return worst


def serving_tower(model: DeltaRecModel, tolerance: float = 1e-4):
    """The numpy tower when it reproduces the model, else None (use torch)."""
    try:
        tower = NumpyUserTower(model)
        difference = tower.matches(model)
    except Exception as error:  # noqa: BLE001 - an unknown model shape: the torch path serves it
        log.warning("numpy user tower unavailable for this model; using torch",
                    extra={"error": str(error)[:200]})
        return None
    if difference is None or difference > tolerance:
        log.warning("numpy user tower does not reproduce this model; using torch",
                    extra={"max_abs_difference": difference})
        return None
    return tower
