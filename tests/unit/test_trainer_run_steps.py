"""The trainer's run steps (pure functions) and gate: id tables, held-out slice, warm start, the gate rule."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from scripts import datasets
from services.trainer import gate, run_steps
from services.trainer.catalog import fallback_vector
from tests.trainer_drills import damage
from services.trainer.interaction_log import Interaction
from services.model.network import ModelConfig

TINY = dataclasses.replace(ModelConfig(), dim=16, num_layers=1, num_heads=1, max_len=20, num_negatives=-1,
                           batch_size=32, epochs=15, incremental_epochs=3, dropout=0.1)


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def with_text(prepared: run_steps.Prepared) -> run_steps.Prepared:
    run_steps.set_item_text(prepared, {i: fallback_vector(i) for i in prepared.data.item_ids.external_ids()})
    return prepared


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    rows = [dataclasses.replace(r, commit_lsn=100) for r in datasets.structured_interactions(n_users=80)]
    prepared = with_text(run_steps.prepare(rows, eval_users=40))
    model, _ = run_steps.run_full(prepared, TINY, seed=1)
    return rows, prepared, model


def test_prepare_keeps_the_parent_order_and_appends_new_items_sorted():
    rows = [Interaction("e1", "u1", "b", "view", 1.0), Interaction("e2", "u1", "z", "view", 2.0),
            Interaction("e3", "u2", "a", "view", 1.0)]
    prepared = run_steps.prepare(rows, item_prefix=["z", "old"], catalog_items=["c", "a"], eval_users=0)
    assert prepared.data.item_ids.external_ids() == ["z", "old", "a", "b", "c"]
    assert prepared.data.user_ids.external_ids() == ["u1", "u2"]


def test_holdout_is_the_last_interaction_of_the_most_recent_users_and_is_not_trained():
    rows = []
    for user, start in (("old", 0.0), ("recent", 100.0), ("short", 500.0)):
        for step in range(4 if user != "short" else 2):
            rows.append(Interaction(f"{user}-{step}", user, f"i{step}", "view", start + step))
    prepared = run_steps.prepare(rows, eval_users=1)
    recent = prepared.data.user_ids.get("recent")
    assert [case.user for case in prepared.holdout] == [recent]   # "short" has < 3 interactions
    assert prepared.holdout[0].target_item == prepared.data.item_ids.get("i3")
    assert len(prepared.train_histories[recent]) == 3
    assert prepared.positions["recent-3"] is None and prepared.positions["recent-2"] == (recent, 2)
    assert len(prepared.train_histories[prepared.data.user_ids.get("old")]) == 4


def test_new_interactions_and_examples():
    rows = [Interaction(f"e{n}", "u", f"i{n % 2}", "view", float(n), commit_lsn=10 if n < 3 else 20, row_id=n)
            for n in range(6)]
    prepared = run_steps.prepare(rows, eval_users=0)
    new, old_counts = run_steps.new_interactions(prepared, after_lsn=10)
    assert [n.key for n in new] == [(1, 3), (1, 4), (1, 5)]
    assert old_counts == {"i0": 2, "i1": 1}
    user_first = [dataclasses.replace(n, key=(1, 0)) for n in new[:1]]
    assert run_steps.examples_of(user_first) == []     # a first interaction predicts nothing


def test_remap_items_scores_like_the_original(trained):
    _, prepared, model = trained
    shuffled = run_steps.prepare(prepared.interactions, item_prefix=list(reversed(prepared.data.item_ids.external_ids())),
                                eval_users=40)
    with_text(shuffled)
    remapped = run_steps.remap_items(model, prepared.data.item_ids.external_ids(), shuffled.data.item_ids)
    assert run_steps.evaluate(remapped, shuffled) == run_steps.evaluate(model, prepared)


def test_training_is_deterministic_for_a_seed(trained):
    _, prepared, model = trained
    again, _ = run_steps.run_full(prepared, TINY, seed=1)
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name


def test_trained_model_beats_popularity_on_the_structured_set(trained):
    from services.trainer.evaluation import evaluate_popularity, popularity_counts
    _, prepared, model = trained
    figures = run_steps.evaluate(model, prepared)
    popular = evaluate_popularity(prepared.holdout, popularity_counts(prepared.train_histories.values(),
                                                                      prepared.data.item_ids.table_size))
    assert figures["recall_at_10"] > popular["recall_at_10"] + 0.1


def test_gate_rejects_a_damaged_candidate_and_passes_an_equal_one(trained):
    _, prepared, model = trained
    same = run_steps.copy_model(model)
    assert gate.evaluate_pair(same, model, prepared).passed
    damaged = run_steps.copy_model(model)
    damage(damaged)
    for z in (0.0, 1.64):                      # refused with or without the noise allowance
        decision = gate.evaluate_pair(damaged, model, prepared, z=z)
        assert not decision.passed
        assert decision.candidate["ndcg_at_10"] < decision.baseline["ndcg_at_10"] * 0.5
        assert "rejected by the gate" in decision.reason


def test_paired_ranks_give_the_same_metrics_as_the_evaluation(trained):
    _, prepared, model = trained
    ranks = run_steps.holdout_ranks(model, prepared)
    assert run_steps.metrics_of_ranks(ranks) == pytest.approx(run_steps.evaluate(model, prepared))
    for metric in ("recall_at_10", "ndcg_at_10", "ndcg_at_5"):
        assert run_steps.per_case_gains(ranks, metric).mean() == pytest.approx(run_steps.evaluate(model, prepared)[metric])


def test_gate_rule():
    base = {"ndcg_at_10": 0.10, "users": 100}
    assert gate.decide({"ndcg_at_10": 0.096, "users": 100}, base, tolerance=0.05).passed
    assert not gate.decide({"ndcg_at_10": 0.094, "users": 100}, base, tolerance=0.05).passed
    # paired differences: a shortfall within the noise of the slice passes, a clear one does not
    noisy = np.array([0.5, -0.5] * 50)[:100] - 0.006       # mean -0.006, stderr ~0.05
    assert gate.decide({"ndcg_at_10": 0.094, "users": 100}, base, differences=noisy, z=1.64).passed
    steady = np.full(100, -0.006) + np.array([0.001, -0.001] * 50)
    assert not gate.decide({"ndcg_at_10": 0.094, "users": 100}, base, differences=steady, z=1.64).passed
    assert not gate.decide({"ndcg_at_10": 0.094, "users": 100}, base, differences=noisy, z=0.0).passed
    assert gate.decide({"ndcg_at_10": 0.0, "users": 100}, None).passed          # first version
    assert gate.decide({"ndcg_at_10": 0.0, "users": 0}, base).passed             # nothing to compare on
    assert gate.decide({"recall_at_10": 0.2, "users": 5}, {"recall_at_10": 0.2, "users": 5},
                       metric="recall_at_10", tolerance=0.0).passed


def test_update_grows_the_id_table_and_new_items_get_vectors(trained):
    rows, prepared, model = trained
    parent_ids = prepared.data.item_ids.external_ids()
    more = [dataclasses.replace(r, commit_lsn=200) for r in datasets.structured_interactions(
        n_users=30, start=datasets.STRUCTURED_T0 + 50_000, user_prefix="N", item_prefix="J", seed=3)]
    grown = with_text(run_steps.prepare(rows + more, item_prefix=parent_ids, eval_users=40))
    assert grown.data.item_ids.external_ids()[:len(parent_ids)] == parent_ids
    new_ids = grown.data.item_ids.external_ids()[len(parent_ids):]
    assert new_ids and all(i.startswith("J") for i in new_ids)

    candidate = run_steps.remap_items(model, parent_ids, grown.data.item_ids)
    new, old_counts = run_steps.new_interactions(grown, after_lsn=100)
    examples = run_steps.examples_of(new)
    stats = run_steps.run_incremental(candidate, grown, examples, replay_ratio=1.0, seed=1)
    assert stats.replay_examples == len(examples)
    assert candidate.num_items == len(parent_ids) + len(new_ids)
    # old rows moved on from the parent's but stayed in place; new rows were trained off zero
    new_rows = candidate.item_id_embedding.weight[len(parent_ids) + 1:]
    assert (new_rows.abs().sum(dim=1) > 0).all()
    ids, vectors = run_steps.item_vector_table(candidate, grown, grown.data.item_ids.external_ids())
    assert set(new_ids) <= set(ids) and vectors.shape == (len(ids), TINY.dim)
    assert np.isfinite(vectors).all() and (np.abs(vectors[[ids.index(i) for i in new_ids]]).sum(axis=1) > 0).all()


def test_status_progress_follows_the_epochs_of_a_run(trained):
    from services.trainer.runs import Progress, TrainerCore
    _, prepared, _ = trained
    core = TrainerCore.__new__(TrainerCore)         # only the progress plumbing is exercised
    core.show_progress, core.progress = False, Progress(1, "full")
    seen = []

    def on_epoch(done: int, epochs: int) -> None:
        core._epoch_progress(done, epochs)
        seen.append((core.progress.epoch, core.progress.epochs))

    run_steps.run_full(prepared, dataclasses.replace(TINY, epochs=3), seed=1, on_epoch=on_epoch)
    assert seen == [(0, 3), (1, 3), (1, 3), (2, 3), (2, 3), (3, 3)]
    assert (core.progress.epoch, core.progress.epochs) == (3, 3)


def _update_inputs(trained):
    rows, prepared, model = trained
    parent_ids = prepared.data.item_ids.external_ids()
    more = [dataclasses.replace(r, commit_lsn=200) for r in datasets.structured_interactions(
        n_users=30, start=datasets.STRUCTURED_T0 + 50_000, user_prefix="N", item_prefix="J", seed=3)]
    grown = with_text(run_steps.prepare(rows + more, item_prefix=parent_ids, eval_users=40))
    new, _ = run_steps.new_interactions(grown, after_lsn=100)
    return model, parent_ids, grown, run_steps.examples_of(new)


def _policy_update(trained, policy):
    model, parent_ids, grown, examples = _update_inputs(trained)
    parent = run_steps.remap_items(model, parent_ids, grown.data.item_ids)
    candidate = run_steps.copy_model(parent)
    run_steps.run_incremental(candidate, grown, examples, replay_ratio=1.0, seed=1, policy=policy)
    return parent, candidate, grown, examples, len(parent_ids)


def _distance(a, b) -> float:
    return sum(float((p - q).pow(2).sum()) for p, q in zip(a.parameters(), b.parameters()))


def test_incremental_policy_values_are_validated():
    from services.trainer.training import IncrementalPolicy
    with pytest.raises(ValueError, match="anchor"):
        IncrementalPolicy(anchor=1.0).validate()
    with pytest.raises(ValueError, match="parent_weight"):
        IncrementalPolicy(parent_weight=-0.1).validate()
    with pytest.raises(ValueError, match="replay_from"):
        IncrementalPolicy(replay_from="everything").validate()
    assert not IncrementalPolicy().needs_parent and IncrementalPolicy(anchor=0.1).needs_parent


def _histories(lengths: dict[int, int]):
    from services.trainer.interaction_data import UserHistory
    return {user: UserHistory(np.arange(1, n + 1, dtype=np.int64), np.ones(n, np.int64),
                              np.arange(n, dtype=np.float64)) for user, n in lengths.items()}


def test_replay_from_own_history_rides_the_new_examples_windows():
    """Own-history replay draws the earlier targets inside the new examples' encoder windows, so
    the update has no more windows than its new examples alone; only what they cannot supply
    comes from other users."""
    from services.trainer.training import replay_examples
    from services.trainer.windows import TrainingExample, group_into_windows
    histories = _histories({1: 30, 2: 6, 3: 12, 4: 9})
    new = [TrainingExample(1, 29), TrainingExample(2, 5)]
    max_len = 10
    windows_new = group_into_windows(new, max_len)
    replay = replay_examples(histories, new, 8, max_len, "own_history", np.random.default_rng(0))
    assert len(replay) == len(set(replay)) == 8 and not set(replay) & set(new)
    # user 1's window covers positions 20..29, user 2's 1..5: every draw lies there
    assert all((e.user == 1 and 20 <= e.target_position < 29) or (e.user == 2 and 1 <= e.target_position < 5)
               for e in replay)
    assert len(group_into_windows(new + replay, max_len)) == len(windows_new)
    # more than the windows hold (9 + 4 = 13): all of them, then other prefixes
    more = replay_examples(histories, new, 20, max_len, "own_history", np.random.default_rng(0))
    own = [e for e in more if (e.user == 1 and e.target_position >= 20) or e.user == 2]
    assert len(more) == len(set(more)) == 20 and len(own) == 13 and not set(more) & set(new)
    # uniform: from every other prefix, no new example, capped by what exists (29+5+11+8 - 2 = 51)
    uniform = replay_examples(histories, new, 20, max_len, "uniform", np.random.default_rng(0))
    assert len(set(uniform)) == 20 and not set(uniform) & set(new)
    assert len({e.user for e in uniform}) > 2
    assert len(replay_examples(histories, new, 500, max_len, "uniform", np.random.default_rng(0))) == 51
    assert all(1 <= e.target_position < len(histories[e.user])
               for e in replay_examples(histories, new, 500, max_len, "own_history", np.random.default_rng(1)))
    assert replay_examples(histories, new, 0, max_len, "own_history", np.random.default_rng(0)) == []


def test_anchor_keeps_an_update_closer_to_its_parent(trained):
    from services.trainer.training import IncrementalPolicy
    parent, free, *_ = _policy_update(trained, IncrementalPolicy())
    _, anchored, *_ = _policy_update(trained, IncrementalPolicy(anchor=0.2))
    assert 0.0 < _distance(anchored, parent) < 0.5 * _distance(free, parent)


def test_parent_weight_averages_the_fine_tuned_weights_with_the_parent(trained):
    from services.trainer.training import IncrementalPolicy
    parent, free, *_ = _policy_update(trained, IncrementalPolicy())
    _, averaged, *_ = _policy_update(trained, IncrementalPolicy(parent_weight=0.25))
    for (name, p), f, q in zip(averaged.named_parameters(), free.parameters(), parent.parameters()):
        torch.testing.assert_close(p, 0.25 * q + 0.75 * f, msg=name)   # training is deterministic per seed


def test_freeze_items_moves_only_new_rows_and_rows_of_the_new_targets(trained):
    from services.trainer.training import IncrementalPolicy
    parent, frozen, grown, examples, parent_items = _policy_update(trained, IncrementalPolicy(freeze_items=True))
    targets = {int(grown.train_histories[e.user].items[e.target_position]) for e in examples}
    moved = {int(i) for i in torch.nonzero((frozen.item_id_embedding.weight - parent.item_id_embedding.weight)
                                           .abs().sum(dim=1) > 0).flatten()}
    # the new interactions are with new items (rows grown by remap_items): those rows learn, no other does
    assert moved and moved <= targets and 0 not in moved
    assert all(row > parent_items for row in moved)
    _, free, *_ = _policy_update(trained, IncrementalPolicy())
    free_moved = torch.nonzero((free.item_id_embedding.weight - parent.item_id_embedding.weight)
                               .abs().sum(dim=1) > 0).flatten().numel()
    assert free_moved > len(moved)         # without freezing, unrelated rows move too


def test_trainer_config_builds_the_incremental_policy_from_the_environment():
    from services.common.config import ConfigError, load
    from services.trainer.config import TrainerConfig
    base = {"DATABASE_URL": "postgresql://x@localhost/db"}
    config = load(TrainerConfig, {**base, "TRAINER_INCREMENTAL_ANCHOR": "0.01",
                                  "TRAINER_INCREMENTAL_PARENT_WEIGHT": "0.5", "TRAINER_INCREMENTAL_FREEZE_ITEMS": "1"})
    policy = config.incremental_policy()
    assert (policy.anchor, policy.parent_weight, policy.freeze_items) == (0.01, 0.5, True)
    with pytest.raises(ConfigError, match="TRAINER_INCREMENTAL_ANCHOR"):
        load(TrainerConfig, {**base, "TRAINER_INCREMENTAL_ANCHOR": "1.5"})
