"""The steps of a run (full training or incremental update) as plain functions over in-memory
data: prepare the inputs, train (training.py), evaluate the held-out slice, remap and export.

No database, etcd or gRPC here: `services.trainer.runs` feeds these functions from the
interaction log and the feature store and stores what they return; `bench/incremental.py`
calls them directly.

Data preparation (`prepare`)
    * item id table: the parent's ids first, in the parent's order (an index, once given, keeps
      its meaning, so warm-started rows stay with their items), then every other known item
      (catalog and interactions) in sorted order: new items GROW the table, nothing collides;
    * users: the model has no per-user parameters, a user is its history; a new user only needs
      its interactions;
    * held-out slice (the gate's evaluation set), prequential (test-then-train): the last
      interaction of each of the `eval_users` most recently active users with at least 3
      interactions, among the users whose last interaction arrived AFTER `holdout_after_lsn` (the
      current version's training cutoff; None: every user). The run does not train on those targets, the current
      version never saw them: the two are compared on fresh interactions neither has learned.
      The NEXT version trains on them (`new_interactions(..., retrain=...)` adds its parent's
      held-out interactions to the new ones; a full training trains on everything but its own
      slice), so no interaction is withheld from the served model for longer than one version.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from services.contracts.event_types import EventType
from services.trainer.id_map import IdMap
from services.trainer.interaction_data import InteractionData, UserHistory
from services.trainer.leave_one_out import EvalCase
from services.trainer.windows import TrainingExample
from services.trainer.evaluation import evaluate_model, metrics_from_ranks, rank_targets
from services.trainer.interaction_log import Interaction
from services.model.network import DeltaRecModel, ModelConfig
from services.trainer.strategies import NewInteraction
from services.trainer.training import EpochProgress, IncrementalPolicy, TrainingStats, train_full, update_incremental


TEXT_DIM = 384
METRIC_NAMES = ("recall_at_5", "recall_at_10", "ndcg_at_5", "ndcg_at_10")


@dataclass
class Prepared:
    """Everything a run needs, in the model's index space."""
    data: InteractionData                      # all interactions (histories complete)
    train_histories: dict[int, UserHistory]    # held-out targets removed
    holdout: list[EvalCase]
    # position of each interaction in its user's TRAINING history (None: held out)
    positions: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    interactions: list[Interaction] = field(default_factory=list)

    def training_view(self) -> InteractionData:
        """`data` with the training histories (same id maps and text table)."""
        return dataclasses.replace(self.data, histories=self.train_histories)

    @property
    def num_items(self) -> int:
        return self.data.num_items


def item_order(prefix: Sequence[str], others: Iterable[str]) -> IdMap:
    ids = IdMap(prefix)
    for item_id in sorted(set(others) - set(prefix)):
        ids.add(item_id)
    return ids


def prepare(interactions: Sequence[Interaction], *, item_prefix: Sequence[str] = (),
            catalog_items: Iterable[str] = (), eval_users: int = 2000, holdout_after_lsn: int | None = None) -> Prepared:
    """Id maps, per-user histories in time order, held-out slice (see the module docstring)."""
    data = InteractionData()
    data.item_ids = item_order(item_prefix, list(catalog_items) + [i.item_id for i in interactions])
    by_user: dict[str, list[Interaction]] = {}
    for interaction in interactions:
        by_user.setdefault(interaction.user_id, []).append(interaction)
    for user_id in sorted(by_user):
        rows = sorted(by_user[user_id], key=lambda i: (i.occurred_at, i.row_id, i.event_id))
        by_user[user_id] = rows
        user = data.user_ids.add(user_id)
        data.histories[user] = UserHistory(
            items=np.array([data.item_ids.get(r.item_id) for r in rows], np.int64),
            events=np.array([int(EventType.parse(r.event_type)) for r in rows], np.int64),
            timestamps=np.array([r.occurred_at for r in rows], np.float64))
    data.item_text = np.zeros((data.item_ids.table_size, TEXT_DIM), np.float32)

    eligible = [(float(h.timestamps[-1]), data.user_ids.external(u), u)
                for u, h in data.histories.items()
                if len(h) >= 3 and (holdout_after_lsn is None
                                    or by_user[data.user_ids.external(u)][-1].commit_lsn > holdout_after_lsn)]
    eligible.sort(key=lambda row: (-row[0], row[1]))
    held_out_users = {u for _, _, u in eligible[:max(0, eval_users)]}
    train_histories: dict[int, UserHistory] = {}
    holdout: list[EvalCase] = []
    positions: dict[str, tuple[int, int] | None] = {}
    for user, history in data.histories.items():
        rows = by_user[data.user_ids.external(user)]
        if user in held_out_users:
            train_histories[user] = history.head(-1)
            holdout.append(EvalCase(user, history.head(-1), int(history.items[-1]), float(history.timestamps[-1])))
            positions[rows[-1].event_id] = None
            rows = rows[:-1]
        else:
            train_histories[user] = history
        for position, row in enumerate(rows):
            positions[row.event_id] = (user, position)
    holdout.sort(key=lambda case: case.user)
    return Prepared(data, train_histories, holdout, positions, list(interactions))


def set_item_text(prepared: Prepared, vectors: Mapping[str, np.ndarray]) -> int:
    """Fills the text table from `vectors` (item id -> 384-d); returns how many were missing."""
    table = np.zeros((prepared.data.item_ids.table_size, TEXT_DIM), np.float32)
    missing = 0
    for index, item_id in enumerate(prepared.data.item_ids.external_ids(), start=1):
        vector = vectors.get(item_id)
        if vector is None:
            missing += 1
            continue
        table[index] = vector
    prepared.data.item_text = table
    return missing


# ------------------------------------------------------------------------------------ runs

def held_out_events(prepared: Prepared) -> list[str]:
    """Event ids of the held-out slice (recorded with the run: the next version trains on them)."""
    return sorted(event_id for event_id, position in prepared.positions.items() if position is None)


def new_interactions(prepared: Prepared, after_lsn: int, retrain: Iterable[str] = ()
                     ) -> tuple[list[NewInteraction], dict[str, int]]:
    """Interactions recorded after `after_lsn` (the parent's lsn_to) that are trainable, plus the
    parent's held-out interactions `retrain` (event ids: recorded before the parent's cutoff but
    never trained on), and the per-item interaction counts before it (for item novelty)."""
    new: list[NewInteraction] = []
    old_counts: dict[str, int] = {}
    retrain = set(retrain)
    for interaction in prepared.interactions:
        if interaction.commit_lsn <= after_lsn and interaction.event_id not in retrain:
            old_counts[interaction.item_id] = old_counts.get(interaction.item_id, 0) + 1
            continue
        position = prepared.positions.get(interaction.event_id)
        if position is None:
            continue  # held out for the gate
        new.append(NewInteraction(key=position, user=interaction.user_id, item=interaction.item_id,
                                  occurred_at=interaction.occurred_at, seq=interaction.row_id))
    return new, old_counts


def examples_of(selected: Iterable[NewInteraction]) -> list[TrainingExample]:
    """Selected interactions as next-item examples (a user's first interaction predicts nothing:
    it is context only)."""
    return sorted({TrainingExample(user, position) for user, position in (s.key for s in selected)
                   if position >= 1}, key=lambda e: (e.user, e.target_position))


def run_full(prepared: Prepared, config: ModelConfig, seed: int, epochs: int | None = None,
             progress: bool = False, on_epoch: EpochProgress | None = None,
             device: torch.device | str = "cpu") -> tuple[DeltaRecModel, TrainingStats]:
    return train_full(prepared.data, config, seed=seed, epochs=epochs, progress=progress,
                      histories=prepared.train_histories, on_epoch=on_epoch, device=device)


def run_incremental(model: DeltaRecModel, prepared: Prepared, examples: Sequence[TrainingExample],
                    replay_ratio: float, seed: int, epochs: int | None = None,
                    progress: bool = False, on_epoch: EpochProgress | None = None,
                    device: torch.device | str = "cpu",
                    policy: IncrementalPolicy = IncrementalPolicy()) -> TrainingStats:
    """Warm-start fine-tune of `model` in place (its id table must be a prefix of the prepared
    one: see `remap_items`); grows the id table to the prepared item count."""
    return update_incremental(model, prepared.training_view(), examples, replay_ratio=replay_ratio,
                              seed=seed, epochs=epochs, progress=progress, on_epoch=on_epoch, device=device,
                              policy=policy)


def evaluate(model: DeltaRecModel, prepared: Prepared) -> dict:
    """Metrics on the held-out slice, ranking against all items."""
    if not prepared.holdout:
        return {**{name: 0.0 for name in METRIC_NAMES}, "users": 0}
    figures = evaluate_model(model, prepared.holdout, prepared.data.item_text)
    return {**{name: float(figures[name]) for name in METRIC_NAMES}, "users": len(prepared.holdout)}


def holdout_ranks(model: DeltaRecModel, prepared: Prepared) -> np.ndarray:
    """0-based rank of each held-out target among all items (the protocol of
    `evaluation.evaluate_model`, unmasked), per case: what a paired comparison needs."""
    return rank_targets(model, prepared.holdout, prepared.data.item_text)


def metrics_of_ranks(ranks: np.ndarray) -> dict:
    figures = metrics_from_ranks(ranks)
    return {**{name: float(figures[name]) for name in METRIC_NAMES}, "users": int(len(ranks))}


def per_case_gains(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Each case's contribution to `metric` (recall_at_K or ndcg_at_K): their mean is the metric."""
    kind, _, k = metric.rpartition("_at_")
    hit = ranks < int(k)
    if kind == "recall":
        return hit.astype(np.float64)
    if kind == "ndcg":
        return np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    raise ValueError(f"unknown metric {metric!r}")


# ------------------------------------------------------------------------------------ models

def remap_items(model: DeltaRecModel, model_item_ids: Sequence[str], target: IdMap) -> DeltaRecModel:
    """A copy of `model` whose id table follows `target`'s indexes: rows of known items move to
    their new index, unknown items get row 0 (text-only vector). The copy scores every item
    exactly like `model` does, so two versions with different id tables can be compared on one
    evaluation set. When `model_item_ids` is a prefix of `target`, the copy is `model` grown."""
    weights = model.item_id_embedding.weight.detach()
    rows = weights[0].expand(target.table_size, -1).clone()   # row 0: "no learned id"
    for old_index, item_id in enumerate(model_item_ids, start=1):
        new_index = target.get(item_id)
        if new_index:
            rows[new_index] = weights[old_index]
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    state["item_id_embedding.weight"] = rows
    remapped = DeltaRecModel(model.config, num_items=len(target))
    remapped.load_state_dict(state)
    remapped.train(model.training)
    return remapped


@torch.no_grad()
def item_vector_table(model: DeltaRecModel, prepared: Prepared, active_items: Sequence[str]
                      ) -> tuple[list[str], np.ndarray]:
    """The item tower's output for `active_items` (ids absent from the table: text-only)."""
    model.eval()
    table = model.all_item_vectors(torch.as_tensor(prepared.data.item_text, dtype=torch.float32))
    ids = [item_id for item_id in active_items if item_id in prepared.data.item_ids]
    indexes = torch.tensor([prepared.data.item_ids.get(item_id) for item_id in ids], dtype=torch.long)
    vectors = table[indexes].numpy().astype(np.float32) if ids else np.zeros((0, model.config.dim), np.float32)
    return ids, vectors


def popular_items(interactions: Sequence[Interaction], k: int = 100,
                  active: set[str] | None = None) -> list[str]:
    counts: dict[str, int] = {}
    for interaction in interactions:
        if active is None or interaction.item_id in active:
            counts[interaction.item_id] = counts.get(interaction.item_id, 0) + 1
    return [item for item, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def copy_model(model: DeltaRecModel) -> DeltaRecModel:
    return copy.deepcopy(model)
