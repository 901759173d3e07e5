"""The live faiss index: incremental add/update/remove, deletion filter, rebuilds, checksum."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from services.ranker.index_structures import IndexOptions
from services.ranker.vector_index import VectorIndex

faiss.omp_set_num_threads(1)


def vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top(x: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    scores = x @ query
    return [int(ids[i]) for i in np.argsort(-scores)[:k]]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_add_update_remove_without_rebuild(kind):
    index = VectorIndex(16, IndexOptions(kind=kind, background=False, rebuild_min_dead=10_000))
    x = vectors(300)
    ids = np.arange(300) * 3   # ids need not be dense
    index.upsert(ids, x)
    assert index.size == 300 and index.kind == kind
    scores, found = index.search(x[7:8], 1)
    assert found[0, 0] == ids[7]
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)

    # update: item 21 now points the other way; searching its old vector no longer finds it first
    index.upsert([ids[7]], -x[7:8])
    _, found = index.search(x[7:8], 5)
    assert ids[7] not in found[0]
    _, found = index.search(-x[7:8], 1)
    assert found[0, 0] == ids[7]
    assert index.size == 300

    # remove: never returned again, whatever k
    index.remove([ids[7], ids[8]])
    assert index.size == 298
    _, found = index.search(-x[7:8], 298)
    assert ids[7] not in found[0] and ids[8] not in found[0]
    assert not index.contains(int(ids[7])) and index.has_vector(int(ids[7]))
    assert index.rebuilds == 0


def test_hnsw_deletion_filter_then_background_rebuild_drops_dead_rows():
    index = VectorIndex(16, IndexOptions(kind="hnsw", background=False, rebuild_min_dead=50,
                                         rebuild_dead_fraction=0.2))
    x = vectors(400, seed=1)
    index.upsert(np.arange(400), x)
    index.remove(np.arange(0, 40))          # 40 dead rows: below the threshold, filtered at search time
    assert index.dead_rows == 40 and index.rebuilds == 0
    _, found = index.search(x[:40], 5)
    assert not set(found.ravel().tolist()) & set(range(40))
    index.remove(np.arange(40, 100))        # 100 dead > 0.2 * 300 live: rebuilt
    assert index.rebuilds == 1 and index.dead_rows == 0 and index.size == 300
    _, found = index.search(x[100:101], 1)
    assert found[0, 0] == 100


def test_rebuild_replays_changes_made_while_it_ran():
    index = VectorIndex(16, IndexOptions(kind="hnsw", background=False, rebuild_min_dead=10_000))
    x = vectors(200, seed=2)
    index.upsert(np.arange(200), x)
    # Simulate a change landing between the snapshot and the swap of a rebuild.
    original = index._lock.write
    calls = {"n": 0}

    def write_with_concurrent_change():
        calls["n"] += 1
        if calls["n"] == 1:     # the rebuild's final write section: first apply an outside change
            index._lock.write = original
            index.remove([5])
            index.upsert([500], x[6:7] * -1)
        return original()
    index._lock.write = write_with_concurrent_change
    index.rebuild("flat")
    assert index.kind == "flat"
    _, found = index.search(x[5:6], 200)
    assert 5 not in found[0]
    _, found = index.search(-x[6:7], 1)
    assert found[0, 0] == 500
    assert index.size == 200


def test_auto_switches_to_hnsw_past_the_threshold_and_keeps_answers():
    index = VectorIndex(16, IndexOptions(kind="auto", hnsw_min_items=100, background=False))
    x = vectors(150, seed=3)
    index.upsert(np.arange(60), x[:60])
    assert index.kind == "flat"
    index.upsert(np.arange(60, 150), x[60:])
    assert index.kind == "hnsw" and index.size == 150
    _, found = index.search(x[140:141], 1)
    assert found[0, 0] == 140
    index.remove(np.arange(80))
    assert index.kind == "flat" and index.size == 70


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_search_restricted_to_allowed_ids(kind):
    index = VectorIndex(16, IndexOptions(kind=kind, background=False))
    x = vectors(100, seed=4)
    index.upsert(np.arange(100), x)
    allowed = np.array([3, 50, 77])
    _, found = index.search(x[10:11], 3, allowed=allowed)
    assert sorted(found[0].tolist()) == [3, 50, 77]


def test_flat_results_are_exact():
    index = VectorIndex(16, IndexOptions(kind="flat"))
    x = vectors(500, seed=5)
    ids = np.arange(1000, 1500)
    index.upsert(ids, x)
    query = vectors(1, seed=6)[0]
    _, found = index.search(query, 10)
    assert found[0].tolist() == exact_top(x, ids, query, 10)


def rescans() -> float:
    from prometheus_client import REGISTRY
    return REGISTRY.get_sample_value("deltarec_ranker_index_exact_rescans_total") or 0.0


def test_float16_flat_codes_answer_exactly_what_float32_does_after_updates_and_removals():
    """The default flat codes are float16: same ids and (float32) scores as the float32 index, on
    random queries, after updates and removals, with and without an allowed set."""
    x = vectors(3000, dim=64, seed=11)
    codes16 = VectorIndex(64, IndexOptions(kind="flat"))
    codes32 = VectorIndex(64, IndexOptions(kind="flat", flat_codes="float32"))
    assert codes16._structure.approximate and not codes32._structure.approximate
    for index in (codes16, codes32):
        index.upsert(np.arange(3000), x)
        index.upsert(np.arange(0, 300), vectors(300, dim=64, seed=12))
        index.remove(np.arange(300, 400))
    queries = vectors(200, dim=64, seed=13)
    allowed = np.arange(0, 3000, 7)
    before = rescans()
    for subset in (None, allowed):
        scores16, ids16 = codes16.search(queries, 20, allowed=subset)
        scores32, ids32 = codes32.search(queries, 20, allowed=subset)
        assert (ids16 == ids32).all()
        assert np.allclose(scores16, scores32, atol=1e-5)
        assert not np.isin(ids16, np.arange(300, 400)).any()
    assert rescans() == before          # well-separated scores: proven from the candidates alone


def test_float16_candidates_that_cannot_prove_the_top_k_fall_back_to_an_exact_scan():
    """600 items whose scores differ by less than float16 can tell apart: the re-ranked candidates
    do not prove the top 10, so the query is answered by an exact scan — the true top 10."""
    rng = np.random.default_rng(3)
    base = vectors(1, dim=32, seed=2)[0]
    x = (base + rng.standard_normal((600, 32)).astype(np.float32) * 1e-5).astype(np.float32)
    index = VectorIndex(32, IndexOptions(kind="flat"))
    index.upsert(np.arange(600), x)
    before = rescans()
    scores, found = index.search(base, 10)
    assert rescans() == before + 1
    truth = np.argsort(-(x @ base), kind="stable")[:10]
    assert found[0].tolist() == truth.tolist()
    assert np.allclose(scores[0], (x @ base)[truth])


def test_vectors_beyond_float16s_range_are_searched_exactly():
    x = vectors(200, dim=16, seed=9) * 1e5      # a code would be inf
    index = VectorIndex(16, IndexOptions(kind="flat"))
    index.upsert(np.arange(200), x)
    query = vectors(1, dim=16, seed=10)[0]
    before = rescans()
    _, found = index.search(query, 5)
    assert found[0].tolist() == exact_top(x, np.arange(200), query, 5)
    assert rescans() == before + 1


def test_checksum_is_order_independent_and_tracks_content():
    names = {i: f"item-{i}" for i in range(50)}
    x = vectors(50, seed=7)
    a = VectorIndex(16, IndexOptions(kind="flat"))
    b = VectorIndex(16, IndexOptions(kind="hnsw", background=False))
    a.upsert(np.arange(50), x)
    order = np.random.default_rng(0).permutation(50)
    for start in range(0, 50, 7):     # other batches, other order, other structure
        chunk = order[start:start + 7]
        b.upsert(chunk, x[chunk])
    assert a.checksum(names.get) == b.checksum(names.get)
    before = a.checksum(names.get)
    a.upsert([3], x[4:5])
    assert a.checksum(names.get) != before
    a.upsert([3], x[3:4])
    assert a.checksum(names.get) == before
    a.remove([3])
    assert a.checksum(names.get) != before


def test_unchanged_vectors_are_not_rewritten():
    index = VectorIndex(16, IndexOptions(kind="hnsw", background=False))
    x = vectors(20, seed=8)
    index.upsert(np.arange(20), x)
    version = index.version
    assert index.upsert(np.arange(20), x) == 0
    assert index.version == version and index.dead_rows == 0


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_bulk_load_answers_by_exact_scan_then_builds_its_structure_once(kind):
    index = VectorIndex(16, IndexOptions(kind=kind, background=False))
    index.begin_bulk_load()
    x = vectors(500, seed=3)
    index.upsert(np.arange(500), x)
    index.remove([4, 9])
    index.upsert([5], -x[5:6])
    assert index.kind == "scan" and index.size == 498
    for query in (0, 5, 77):
        _, found = index.search(x[query:query + 1], 10)
        truth = [i for i in np.argsort(-(x @ x[query])) if i not in (4, 5, 9)][:10]
        assert [int(i) for i in found[0]] == [int(i) for i in truth]
    _, found = index.search(x[:1], 5, allowed=np.array([4, 5, 6, 7]))
    assert set(found[0].tolist()) == {5, 6, 7, -1}       # a removed id is never returned
    index.end_bulk_load()
    assert index.kind == kind and index.size == 498 and index.rebuilds == 1
    _, found = index.search(x[77:78], 1)
    assert found[0, 0] == 77
    _, found = index.search(-x[5:6], 1)
    assert found[0, 0] == 5
    _, found = index.search(x[4:5], 498)
    assert 4 not in found[0] and 9 not in found[0]


def test_hnsw_rows_by_id_follow_updates_and_removals():
    index = VectorIndex(16, IndexOptions(kind="hnsw", background=False, rebuild_min_dead=10_000))
    x = vectors(200, seed=4)
    index.upsert(np.arange(200) * 5, x)
    index.upsert([10, 10], np.stack([-x[2], x[2]]))     # the last of a repeated id wins: unchanged
    index.upsert([15], -x[3:4])                          # an update: one dead row
    index.remove([20, 20, 25])
    assert index.dead_rows == 3 and index.size == 198
    _, found = index.search(x[3:4], 198)
    assert 15 not in found[0][:1].tolist() and 20 not in found[0] and 25 not in found[0]
    _, found = index.search(x[2:3], 3, allowed=np.array([10, 20, 15, 999]))
    assert found[0, 0] == 10 and 20 not in found[0]


def test_rebuild_replays_many_concurrent_changes_in_rounds(monkeypatch):
    import services.ranker.vector_index as vector_index
    monkeypatch.setattr(vector_index, "REPLAY_UNDER_LOCK", 8)
    monkeypatch.setattr(vector_index, "REBUILD_CHUNK", 16)
    index = VectorIndex(16, IndexOptions(kind="hnsw", background=False, rebuild_min_dead=10_000))
    x = vectors(600, seed=5)
    index.upsert(np.arange(300), x[:300])
    original_add = vector_index.STRUCTURES["hnsw"].add
    calls = []

    def add_then_change(structure, ids, vecs, replaced):
        original_add(structure, ids, vecs, replaced)
        # while the rebuild runs: new items, updates and removals arrive (three rounds' worth)
        if structure is not index._structure and len(calls) < 3:
            calls.append(len(calls))
            n = len(calls)
            index.upsert(np.arange(300 + 100 * (n - 1), 300 + 100 * n), x[300 + 100 * (n - 1):300 + 100 * n])
            index.upsert([n], -x[n:n + 1])
            index.remove([10 + n])
    monkeypatch.setattr(vector_index.STRUCTURES["hnsw"], "add", add_then_change)
    index.rebuild("hnsw")
    assert len(calls) == 3 and index.rebuilds == 1 and index.size == 600 - 3
    _, found = index.search(x, 1)
    for i in range(600):
        if i in (11, 12, 13):
            assert i not in found[:, 0]
        elif i in (1, 2, 3):
            assert found[i, 0] != i
        else:
            assert found[i, 0] == i
    for n in (1, 2, 3):
        _, found = index.search(-x[n:n + 1], 1)
        assert found[0, 0] == n


def test_build_gate_runs_one_build_at_a_time_most_urgent_first():
    import threading
    import time

    from services.ranker.vector_index import BuildGate
    gate = BuildGate()
    gate.acquire(1)                    # a text build runs
    order: list[str] = []

    def build(name: str, priority: int) -> None:
        gate.acquire(priority)
        order.append(name)
        gate.release()
    late_text = threading.Thread(target=build, args=("text", 1))
    late_text.start()
    while gate.waiting < 1:
        time.sleep(0.001)
    model = threading.Thread(target=build, args=("model", 0))
    model.start()
    while gate.waiting < 2:
        time.sleep(0.001)
    assert order == []                 # nothing starts while one runs
    # the running text build reaches a chunk boundary: the model build waits, so it gives way
    assert gate.checkpoint(1) is True
    assert order[0] == "model"         # ran before the running build took its turn back
    assert gate.checkpoint(1) is False  # only an equally urgent one waits: no yielding to it
    gate.release()
    model.join(5)
    late_text.join(5)
    assert order == ["model", "text"]


def test_background_build_gives_way_to_a_more_urgent_one_between_chunks(monkeypatch):
    """A text-priority HNSW build paused at a chunk boundary while a model-priority build runs
    whole; both end with exact indexes of their own vectors."""
    import threading

    import services.ranker.vector_index as vector_index
    from services.ranker.index_structures import MODEL_BUILD_PRIORITY, TEXT_BUILD_PRIORITY
    from services.ranker.vector_index import BuildGate
    monkeypatch.setattr(vector_index, "REBUILD_CHUNK", 50)
    gate = BuildGate()
    text = VectorIndex(16, IndexOptions(kind="hnsw", build_priority=TEXT_BUILD_PRIORITY), build_gate=gate)
    model = VectorIndex(16, IndexOptions(kind="hnsw", build_priority=MODEL_BUILD_PRIORITY), build_gate=gate)
    x_text, x_model = vectors(400, seed=1), vectors(300, seed=2)
    events: list[str] = []
    model_started = threading.Event()
    original_add = vector_index.STRUCTURES["hnsw"].add

    def add(structure, ids, vecs, replaced):
        owner = "text" if vecs is not None and vecs.shape[0] and np.array_equal(vecs[0], x_text[ids[0]]) else "model"
        events.append(owner)
        if owner == "text" and len(events) == 1:
            # the model index's build is queued while the text build is in its first chunk
            model.begin_bulk_load()
            model.upsert(np.arange(300), x_model)
            model.end_bulk_load()
            model_started.set()
            while gate.waiting < 1:
                threading.Event().wait(0.001)
        original_add(structure, ids, vecs, replaced)
    monkeypatch.setattr(vector_index.STRUCTURES["hnsw"], "add", add)
    text.begin_bulk_load()
    text.upsert(np.arange(400), x_text)
    text.end_bulk_load()
    deadline = threading.Event()
    for _ in range(500):
        if model_started.is_set() and not text.rebuilding and not model.rebuilding:
            break
        deadline.wait(0.01)
    assert not text.rebuilding and not model.rebuilding
    assert text.kind == "hnsw" and model.kind == "hnsw"
    # text chunk 1, then the whole model build (6 chunks of 50), then text chunks 2..8
    assert events == ["text"] + ["model"] * 6 + ["text"] * 7
    _, found = text.search(x_text[:50], 1)
    assert (found[:, 0] == np.arange(50)).mean() > 0.9
    _, found = model.search(x_model[:50], 1)
    assert (found[:, 0] == np.arange(50)).mean() > 0.9


def clustered(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, dim)).astype(np.float32)
    return centers[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)


def loaded(x: np.ndarray, ids: np.ndarray, parent: VectorIndex | None = None, **options) -> VectorIndex:
    index = VectorIndex(x.shape[1], IndexOptions(kind="hnsw", background=False, **options))
    index.begin_bulk_load()
    index.upsert(ids, x)
    index.end_bulk_load(reuse_graph_of=parent)
    return index


def test_a_swap_reuses_the_parents_graph_when_the_vectors_moved_little():
    x = clustered(3000)
    parent = loaded(x, np.arange(3000))
    assert parent.graph_reuses == 0 and parent.built_graph_recall > 0.9
    parent.remove(np.arange(10))                           # dead rows in the parent's graph
    parent.upsert(np.arange(10, 20), x[10:20] * 1.5)
    # the next version: every vector moved by ~5% of its norm, items 0-29 gone, 3000-3099 new
    rng = np.random.default_rng(1)
    y = np.concatenate([x, clustered(100, seed=9)])
    y += 0.05 * np.linalg.norm(y, axis=1, keepdims=True) / 4 * rng.standard_normal(y.shape).astype(np.float32)
    ids = np.arange(30, 3100)
    child = loaded(y[30:], ids, parent=parent)
    assert child.graph_reuses == 1 and child.kind == "hnsw"
    assert child.built_graph_recall == parent.built_graph_recall      # the lineage's fresh build
    assert child.graph_recall >= child.built_graph_recall - 0.02
    # answers are the child's own vectors: exact top-10 found, removed items never
    queries = y[3000:3050]
    _, found = child.search(queries, 10)
    truth = np.argsort(-(y[30:] @ queries.T), axis=0)[:10].T + 30
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())]) > 0.9
    assert not set(found.ravel().tolist()) & set(range(30))
    assert child.contains_many(np.arange(3000, 3100)).all()
    # the parent's graph still holds the parent's vectors (the child rewrote a copy)
    scores, found = parent.search(x[100:101], 20)
    assert np.allclose(scores[0], parent.score(x[100], found[0]), atol=1e-4)


def test_a_swap_to_an_unrelated_space_builds_a_new_graph():
    x = clustered(2000)
    parent = loaded(x, np.arange(2000))
    other = clustered(2000, seed=7)                        # a full retrain: another space
    child = loaded(other, np.arange(2000), parent=parent)
    assert child.graph_reuses == 0 and child.rebuilds == 1
    assert child.built_graph_recall == child.graph_recall > 0.9
    off = loaded(clustered(2000), np.arange(2000), parent=parent, reuse_graph=False)
    assert off.graph_reuses == 0


def test_sampled_recall_is_one_for_an_exact_structure_and_lower_for_a_wrong_one():
    from services.ranker.index_structures import FlatStructure
    from services.ranker.vector_index import sampled_recall
    x = vectors(500, seed=3)
    flat = FlatStructure(16, IndexOptions())
    flat.add(np.arange(500), x, np.zeros(0, np.int64))
    assert sampled_recall(flat, x, np.arange(500)) == 1.0
    wrong = FlatStructure(16, IndexOptions())
    wrong.add(np.arange(500), vectors(500, seed=4), np.zeros(0, np.int64))
    assert sampled_recall(wrong, x, np.arange(500)) < 0.3


def test_the_flat_codes_setting_reaches_both_indexes_and_a_bad_value_names_the_variable():
    from services.common.config import ConfigError, load
    from services.ranker.config import RankerConfig
    minimal = {"DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1:5432/deltarec",
               "FEATURES_ADDRESS": "127.0.0.1:50052"}
    default = load(RankerConfig, minimal)
    assert default.index_options().flat_codes == default.index_options(text=True).flat_codes == "float16"
    plain = load(RankerConfig, {**minimal, "RANKER_FLAT_CODES": "float32"})
    assert plain.index_options().flat_codes == plain.index_options(text=True).flat_codes == "float32"
    assert not VectorIndex(8, plain.index_options())._structure.approximate
    with pytest.raises(ConfigError, match="RANKER_FLAT_CODES"):
        load(RankerConfig, {**minimal, "RANKER_FLAT_CODES": "int8"})
