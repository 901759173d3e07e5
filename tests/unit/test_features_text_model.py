"""The text model loaded in the background (services/features/text_model.py): bulk texts wait for
it, queries are refused (UNAVAILABLE) until it is there, a failed load is reported and retried, and
closing the service releases what waits — without torch (a fake model)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from services.features.embedder import LruCache, MicroBatcher, QueryEmbedder
from services.features.text_model import ModelClosed, ModelLoading, TextModel
from tests import fakes


class FakeEncoder:
    def encode(self, texts, batch_size=64):
        return fakes.text_vectors(list(texts))


def blocked_model(**kwargs) -> tuple[TextModel, threading.Event]:
    release = threading.Event()

    def load():
        release.wait(30)
        return FakeEncoder()
    return TextModel(load, **kwargs).start(), release


def test_bulk_texts_wait_for_the_model_and_queries_are_refused_meanwhile():
    model, release = blocked_model()
    batcher = MicroBatcher(model.encode, dim=model.dim)
    queries = QueryEmbedder(batcher, LruCache(10), usable=lambda text: bool(text.strip()),
                            fallback=model.fallback_vector, model_ready=model.require_ready)
    try:
        assert not model.ready and model.state == "loading"
        bulk = batcher.submit(["Rose Lip Balm", "Mint Face Cream"])
        assert not bulk.done()
        with pytest.raises(ModelLoading, match="loading"):      # UNAVAILABLE, never queued
            queries.embed(["rose"])
        assert queries.embed(["   "]).shape == (1, model.dim)   # no model needed for unusable text
        release.set()
        vectors = bulk.result(timeout=30)
        assert np.allclose(vectors, fakes.text_vectors(["Rose Lip Balm", "Mint Face Cream"]))
        assert model.ready and model.state == "ready" and model.load_seconds > 0
        assert queries.embed(["rose"]).shape == (1, model.dim)
    finally:
        release.set()
        model.close()
        batcher.close()


def test_a_failed_load_is_reported_and_retried():
    attempts = []

    def load():
        attempts.append(1)
        if len(attempts) < 3:
            raise FileNotFoundError("no model/config.json")
        return FakeEncoder()
    model = TextModel(load, retry_s=0.01).start()
    try:
        assert model.wait_ready(30) and len(attempts) == 3 and model.state == "ready"
    finally:
        model.close()
    broken = TextModel(lambda: (_ for _ in ()).throw(OSError("disk")), retry_s=0.01).start()
    try:
        assert not broken.wait_ready(0.2)
        assert broken.state.startswith("failed: OSError: disk")
        with pytest.raises(ModelLoading, match="failed"):
            broken.require_ready()
    finally:
        broken.close()


def test_closing_releases_a_batch_waiting_for_the_model():
    model, release = blocked_model()
    outcome = []

    def waiting():
        try:
            model.encode(["x"])
        except ModelClosed as error:
            outcome.append(error)
    thread = threading.Thread(target=waiting)
    thread.start()
    model.close()
    thread.join(10)
    release.set()
    assert not thread.is_alive() and len(outcome) == 1
