"""Model bundles, hot swap (load, verify, refuse, swap), canary routing; real artifact files."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from services.common.artifacts import ArtifactStore, read_verified
from services.contracts.etcd_keys import MODEL_CANARY, MODEL_CURRENT
from services.contracts.model_pointer import ModelPointer
from services.model.artifact import serialize
from services.model.network import ModelConfig
from services.ranker.catalog import Catalog, ItemUpdate
from services.ranker.filters import FilterSpec
from services.ranker.hot_swap import ModelManager
from services.ranker.index_structures import IndexOptions
from services.ranker.model_bundle import ModelBundle
from services.ranker.model_watch import EtcdModelWatcher
from services.ranker.retrieval import retrieve, with_id_less_prior
from services.ranker.routing import ServingState, canary_bucket
from tests import fakes

torch.set_num_threads(1)

ITEMS = [f"item-{n}" for n in range(300)]


@pytest.fixture
def catalog() -> Catalog:
    catalog = Catalog(IndexOptions(kind="flat"))
    text = fakes.text_vectors(ITEMS)
    catalog.apply([ItemUpdate(item_id, 10 + n, title=f"Title {n}", vector=text[n]) for n, item_id in enumerate(ITEMS)],
                  watermark=400)
    return catalog


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore((tmp_path / "artifacts").as_uri())


def publish(store: ArtifactStore, version: int, items=ITEMS[:250], **kwargs) -> ModelPointer:
    artifact = fakes.make_artifact(version, list(items), fakes.text_vectors(list(items)), **kwargs)
    return ModelPointer.from_json(fakes.store_artifact(store, artifact))


def manager_for(catalog: Catalog) -> tuple[ModelManager, ServingState]:
    state = ServingState()
    return ModelManager(catalog, state, lambda uri, sha: read_verified(uri, sha), IndexOptions(kind="flat")), state


def test_bundle_vectors_are_the_item_tower_and_bitwise_stable(catalog, store):
    manager, state = manager_for(catalog)
    manager.want("current", publish(store, 1))
    manager.process_once()
    bundle = state.current
    assert bundle.version == 1 and bundle.index.size == 300
    # an item with a learned id and one on the text-only path (created after training)
    model = bundle.model
    for item_id, row in (("item-5", 6), ("item-280", 0)):
        iid = catalog.iid(item_id)
        with torch.inference_mode():
            expected = model.item_vectors(torch.tensor([row]), torch.from_numpy(
                catalog.text_index.vectors_of([iid]))).numpy()[0]
        np.testing.assert_allclose(bundle.index.vectors_of([iid])[0], expected, rtol=1e-5, atol=1e-5)
    # the same vector whether computed alone or in the bulk build (checksums agree across replicas)
    iids, names, text, _ = catalog.snapshot()
    alone = np.stack([bundle.compute_vectors([name], text[i:i + 1])[0] for i, name in enumerate(names[:40])])
    assert np.array_equal(alone, bundle.index.vectors_of(iids[:40]))
    assert bundle.artifact_agreement(fakes.make_artifact(1, ITEMS[:250], fakes.text_vectors(ITEMS[:250]))) == 1.0


def test_swap_keeps_in_flight_references_and_releases_the_old_bundle(catalog, store):
    manager, state = manager_for(catalog)
    manager.want("current", publish(store, 1))
    manager.process_once()
    in_flight, variant = state.route("user-1")
    assert (in_flight.version, variant) == (1, "current")
    manager.want("current", publish(store, 2))
    assert manager.process_once() is True
    assert state.current.version == 2 and state.swaps == 2
    # the request that started on v1 finishes on v1, whose index still answers
    _, found = in_flight.index.search(in_flight.index.vectors_of([0]), 3)
    assert found.shape == (1, 3)
    old = weakref.ref(in_flight)
    del in_flight
    gc.collect()
    assert old() is None, "the replaced bundle must be freed once no request holds it"
    assert catalog.listener_count == 1
    # the new bundle follows live item changes
    catalog.apply([ItemUpdate("brand-new", 500, title="Brand New", vector=fakes.text_vectors(["bn"])[0])], 500)
    assert state.current.index.contains(catalog.iid("brand-new"))


def test_corrupt_and_invalid_artifacts_are_refused_and_the_version_stays(catalog, store, tmp_path):
    manager, state = manager_for(catalog)
    good = publish(store, 1)
    manager.want("current", good)
    manager.process_once()

    # bytes that do not match the sha256 in etcd
    bad = publish(store, 2)
    path = tmp_path / "artifacts" / bad.uri.rsplit("/", 1)[1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    manager.want("current", bad)
    manager.process_once()
    assert state.current.version == 1
    assert state.refused_version == 2 and "checksum" in state.refused_reason

    # right checksum, but not an artifact
    uri, sha = store.write("garbage.pt", b"not a model")
    manager.want("current", ModelPointer(3, uri, sha))
    manager.process_once()
    assert state.current.version == 1 and state.refused_version == 3 and "invalid" in state.refused_reason

    # a readable artifact whose weights are broken
    artifact = fakes.make_artifact(4, ITEMS[:250], fakes.text_vectors(ITEMS[:250]))
    artifact.state_dict["text_projection.weight"][0, 0] = float("nan")
    uri, sha = store.write("nan.pt", serialize(artifact))
    manager.want("current", ModelPointer(4, uri, sha))
    manager.process_once()
    assert state.current.version == 1 and state.refused_version == 4 and "non-finite" in state.refused_reason

    # version in etcd and in the artifact disagree
    spec = publish(store, 5)
    manager.want("current", ModelPointer(6, spec.uri, spec.sha256))
    manager.process_once()
    assert state.current.version == 1 and state.refused_version == 6

    # a missing file is refused too, and a later good version still loads
    manager.want("current", ModelPointer(7, (tmp_path / "nope.pt").as_uri(), "0" * 64))
    manager.process_once()
    assert state.current.version == 1 and state.refused_version == 7
    manager.want("current", publish(store, 8))
    manager.process_once()
    assert state.current.version == 8 and catalog.listener_count == 1


def test_canary_share_is_deterministic_and_about_right(catalog, store):
    manager, state = manager_for(catalog)
    manager.want("current", publish(store, 1))
    canary = publish(store, 2)
    manager.want("canary", ModelPointer(canary.version, canary.uri, canary.sha256, share=0.2))
    manager.process_once()
    users = [f"user-{n}" for n in range(3000)]
    first = {u for u in users if state.route(u)[1] == "canary"}
    assert 0.17 < len(first) / len(users) < 0.23
    assert all(state.route(u)[0].version == 2 for u in first)
    assert {u for u in users if state.route(u)[1] == "canary"} == first
    assert first == {u for u in users if canary_bucket(u) < 0.2}

    # promote: the canary's version becomes current, reusing the loaded bundle
    canary_bundle = state.routing.canary
    manager.want("current", canary)
    manager.process_once()
    assert state.current is canary_bundle and state.routing.canary is None
    assert catalog.listener_count == 1

    # a new canary, then abort
    third = publish(store, 3)
    manager.want("canary", ModelPointer(3, third.uri, third.sha256, share=0.5))
    manager.process_once()
    assert state.routing.canary.version == 3
    manager.want("canary", None)
    manager.process_once()
    assert state.routing.canary is None and catalog.listener_count == 1


def test_bundle_refuses_a_model_for_other_text_vectors(catalog, store):
    artifact = fakes.make_artifact(1, ITEMS[:10], fakes.text_vectors(ITEMS[:10]))
    artifact.config.text_dim = 128
    with pytest.raises(Exception):
        ModelBundle(artifact, ModelPointer(1, "file:///x", "0" * 64), artifact.build_model(), catalog)


def test_model_pointer_parsing():
    good = {"version": 3, "uri": "file:///a", "sha256": "a" * 64, "data_lsn": 7, "metrics": {}}
    assert ModelPointer.from_json(good).data_lsn == 7
    assert ModelPointer.from_json({**good, "share": 0.3}, canary=True).share == 0.3
    for bad in ({}, {**good, "sha256": "x"}, {**good, "version": 0}, []):
        with pytest.raises(ValueError):
            ModelPointer.from_json(bad)
    with pytest.raises(ValueError):
        ModelPointer.from_json({**good, "share": 2}, canary=True)


def test_watcher_refuses_an_unusable_pointer_and_follows_a_good_one(catalog, store):
    manager, state = manager_for(catalog)
    watcher = EtcdModelWatcher(etcd=None, manager=manager)
    good = publish(store, 1)
    watcher._apply(MODEL_CURRENT, b"{not json")
    assert manager.wanted("current") is None and state.refused_version == 0
    assert state.refused_reason.startswith(MODEL_CURRENT)
    watcher._apply(MODEL_CURRENT, good.to_json())
    watcher._apply(MODEL_CANARY, ModelPointer(2, good.uri, good.sha256, share=0.25).to_json(canary=True))
    assert manager.wanted("current") == good and manager.wanted("canary").share == 0.25
    watcher._apply(MODEL_CANARY, None)           # canary deleted: aborted
    watcher._apply(MODEL_CURRENT, None)          # current deleted: keep what is wanted
    assert manager.wanted("canary") is None and manager.wanted("current") == good


def test_id_less_items_are_served_with_the_models_popularity_prior(catalog, store):
    """Items without a learned id (here the 50 the model was not trained on) get
    id_less_popularity_weight * log(1 + popularity) on top of their text score; items with an id,
    and id-less items without popularity, keep their index score."""
    artifact = fakes.make_artifact(1, ITEMS[:250], fakes.text_vectors(ITEMS[:250]))
    artifact.config = ModelConfig.from_dict({**artifact.config.to_dict(), "id_less_popularity_weight": 2.0})
    manager, state = manager_for(catalog)
    manager.want("current", ModelPointer.from_json(fakes.store_artifact(store, artifact)))
    manager.process_once()
    bundle = state.current
    assert bundle.id_less_popularity_weight == 2.0
    assert bundle.id_less_iids == {catalog.iid(item_id) for item_id in ITEMS[250:]}
    lifted = catalog.iid("item-290")
    catalog.apply([ItemUpdate("item-290", 500, title="Title 290", popularity=1e6),
                   ItemUpdate("item-7", 501, title="Title 7", popularity=1e6)], watermark=501)
    query = np.random.default_rng(0).standard_normal(bundle.dim).astype(np.float32)
    found = retrieve(catalog, bundle.index, query, 10, FilterSpec(), set())
    served = with_id_less_prior(catalog, bundle.index, query, 10, FilterSpec(), set(), found,
                                bundle.id_less_iids, bundle.id_less_popularity_weight)
    assert served[0][0] == lifted
    assert served[0][1] == pytest.approx(float(bundle.index.score(query, np.array([lifted]))[0])
                                         + 2.0 * np.log1p(1e6), rel=1e-5)
    assert served[1:] == [pair for pair in found if pair[0] != lifted][:9]   # item-7 has an id: no prior
    excluded = with_id_less_prior(catalog, bundle.index, query, 10, FilterSpec(), {lifted}, found,
                                  bundle.id_less_iids, bundle.id_less_popularity_weight)
    assert lifted not in {iid for iid, _ in excluded}
    assert with_id_less_prior(catalog, bundle.index, query, 10, FilterSpec(), set(), found,
                              bundle.id_less_iids, 0.0) == found
