"""The numpy user tower reproduces DeltaRecModel.user_vector (or is not used)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from services.ranker.numpy_tower import NumpyUserTower, serving_tower
from tests import fakes

torch.set_num_threads(1)


@pytest.mark.parametrize("layers,dim,max_len", [(1, 32, 20), (2, 64, 50)])
def test_matches_the_torch_model(layers, dim, max_len):
    ids = [f"i{n}" for n in range(50)]
    artifact = fakes.make_artifact(3, ids, fakes.text_vectors(ids), dim=dim, max_len=max_len, num_layers=layers)
    model = artifact.build_model()
    with torch.no_grad():      # trained models have non-zero recency biases and event embeddings
        model.recency_bias.weight.normal_()
        model.event_embedding.weight.normal_()
        model.empty_history_vector.normal_()
    tower = NumpyUserTower(model)
    assert tower.matches(model) <= 1e-4
    rng = np.random.default_rng(1)
    for length in (1, 3, max_len):
        vectors = rng.standard_normal((length, dim)).astype(np.float32)
        events = rng.integers(1, 5, length)
        ages = np.sort(rng.uniform(0, 400 * 86400.0, length)).astype(np.float32)[::-1].copy()
        with torch.inference_mode():
            expected = model.user_vector(torch.ones((1, length), dtype=torch.long),
                                         torch.from_numpy(events).view(1, -1), torch.from_numpy(ages).view(1, -1),
                                         history_item_vectors=torch.from_numpy(vectors).view(1, length, dim))[0]
        np.testing.assert_allclose(tower(vectors, events, ages), expected.numpy(), atol=1e-4)
    assert np.array_equal(tower(np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)),
                          model.empty_history_vector.detach().numpy())


def test_an_unknown_architecture_falls_back_to_torch():
    ids = [f"i{n}" for n in range(10)]
    model = fakes.make_artifact(1, ids, fakes.text_vectors(ids)).build_model()
    model.blocks[0].feed_forward[1] = torch.nn.ReLU()
    assert serving_tower(model) is None
