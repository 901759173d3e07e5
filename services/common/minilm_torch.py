"""MiniLM (all-MiniLM-L6-v2, a 6-layer BERT) evaluated with plain torch and the `tokenizers`
library: the same weights, tokenizer file and pipeline as `TextEncoder`, without importing
transformers.

Why: on the 2 shared cores, loading MiniLM through transformers was dominated by importing it
(its modeling modules pull in most of the library: 11-38 s measured under load, against 0.1 s
for the weights themselves), which a features restart paid before it could embed anything. Here
the load is importing torch, reading the safetensors file and the tokenizer.json — the forward
pass is the standard BERT one (embeddings + LayerNorm; per layer self-attention, residual and
LayerNorm, GELU feed-forward, residual and LayerNorm), pooled like sentence-transformers (mean
over the attention mask, L2-normalised). tests/unit/test_minilm_torch.py checks it against
`TextEncoder` (max difference ~1e-7).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from services.common.text_encoder import MAX_TOKENS, MINILM_DIM, MINILM_MODEL_NAME, TextEncoder, locate_minilm_dir


class TorchMiniLM(TextEncoder):
    """A `TextEncoder` (same `encode`, same fallback vectors) whose model runs in plain torch."""

    def __init__(self, model_dir: str | Path | None = None, num_threads: int | None = None) -> None:
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.model_dir = Path(model_dir) if model_dir is not None else locate_minilm_dir()
        self.model_name, self.dim = MINILM_MODEL_NAME, MINILM_DIM
        self._torch = torch
        config = json.loads((self.model_dir / "config.json").read_text())
        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu" \
                or config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{self.model_dir}: not the BERT layout this encoder evaluates")
        self._heads = int(config["num_attention_heads"])
        self._layers = int(config["num_hidden_layers"])
        self._eps = float(config["layer_norm_eps"])
        self._tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=int(config.get("pad_token_id", 0)), pad_token="[PAD]")
        weights = load_file(str(self.model_dir / "model.safetensors"))
        self._w = {name.removeprefix("bert."): tensor for name, tensor in weights.items()}
        if self._w["embeddings.word_embeddings.weight"].shape[1] != MINILM_DIM:
            raise ValueError(f"{self.model_dir}: hidden size is not {MINILM_DIM}")

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        torch, w = self._torch, self._w
        functional = torch.nn.functional
        encodings = self._tokenizer.encode_batch(texts)
        ids = torch.tensor([encoding.ids for encoding in encodings])
        mask = torch.tensor([encoding.attention_mask for encoding in encodings])
        batch, length = ids.shape
        heads, width = self._heads, MINILM_DIM
        head_width = width // heads

        def norm(x, name):
            return functional.layer_norm(x, (width,), w[f"{name}.weight"], w[f"{name}.bias"], self._eps)

        def linear(x, name):
            return functional.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])

        def split(x):
            return x.view(batch, length, heads, head_width).transpose(1, 2)

        with torch.inference_mode():
            x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:length]
                 + w["embeddings.token_type_embeddings.weight"][0])
            x = norm(x, "embeddings.LayerNorm")
            # Padding positions get the most negative value before the softmax (as BERT does).
            blocked = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
            for layer in range(self._layers):
                prefix = f"encoder.layer.{layer}"
                attended = functional.scaled_dot_product_attention(
                    split(linear(x, f"{prefix}.attention.self.query")),
                    split(linear(x, f"{prefix}.attention.self.key")),
                    split(linear(x, f"{prefix}.attention.self.value")), attn_mask=blocked)
                attended = attended.transpose(1, 2).reshape(batch, length, width)
                x = norm(linear(attended, f"{prefix}.attention.output.dense") + x, f"{prefix}.attention.output.LayerNorm")
                hidden = functional.gelu(linear(x, f"{prefix}.intermediate.dense"))
                x = norm(linear(hidden, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm")
            weights = mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            pooled = functional.normalize(pooled, p=2, dim=1)
        return pooled.float().numpy()

