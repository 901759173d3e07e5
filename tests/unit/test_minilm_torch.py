"""The plain-torch MiniLM (services/common/minilm_torch.py) gives the vectors TextEncoder
(transformers) gives: same tokens (truncation at 256, accents, case, padding within a batch),
same forward pass, same pooling and fallbacks."""
from __future__ import annotations

import numpy as np
import pytest

from services.common.minilm_torch import TorchMiniLM
from services.common.text_encoder import TextEncoder

TEXTS = ["Rose Lip Balm", "NORDIC glow hair oil, 100 ml — No. 7", "Crème brûlée body lotion für trockene Haut",
         "spf 50", "", "   ", "x", "moisturising " * 400,       # 400 words: truncated at 256 tokens
         "日本の化粧水 (toner) 200ml", "a", "Night cream with retinol & hyaluronic acid; fragrance-free"]


@pytest.fixture(scope="module")
def encoders():
    return TextEncoder(num_threads=1), TorchMiniLM(num_threads=1)


def test_same_vectors_as_transformers(encoders):
    reference, torch_only = encoders
    for batch_size in (1, 4, 64):
        expected = reference.encode(TEXTS, batch_size=batch_size, fallback_keys=[f"k{i}" for i in range(len(TEXTS))])
        got = torch_only.encode(TEXTS, batch_size=batch_size, fallback_keys=[f"k{i}" for i in range(len(TEXTS))])
        assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
        assert np.abs(got - expected).max() < 1e-5
    assert torch_only.model_name == reference.model_name and torch_only.dim == reference.dim
