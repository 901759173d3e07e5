"""Full-ranking evaluation (Recall@K, NDCG@K) and a popularity baseline.

Protocol: every eval case ranks its single target against ALL catalogue items
(indexes 1..n; index 0 is padding and never ranked).

History masking: by default NOTHING is masked, i.e. items the user already
interacted with stay in the ranking - the conservative choice: no Beauty
validation/test target repeats an item from the user's history, so masking
can only raise the figures. ``mask_history=True`` filters them out, as the
ranker does by default and as the eSASRec benchmark (RecTools
``recommend(filter_viewed=True)``) and CBiT evaluate; ActionPiece's evaluator
does not filter. bench/accuracy.py reports both and compares each published
row with the figure under that row's own protocol (README "Accuracy").

Ties are broken deterministically by item index: an item ranks
above the target if its score is higher, or equal with a smaller index. This
matters for the popularity baseline, whose scores tie a lot.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from services.trainer.batching import collate_histories
from services.trainer.interaction_data import UserHistory
from services.trainer.leave_one_out import EvalCase
from services.model.network import DeltaRecModel
from services.model.new_items import reserve_new_item_slots

DEFAULT_CUTOFFS: tuple[int, ...] = (5, 10)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all columns of ``scores`` ``[b, n]``."""
    target_scores = scores.gather(1, targets.unsqueeze(1))
    columns = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)
    ahead = (scores > target_scores) | ((scores == target_scores) & (columns < targets.unsqueeze(1)))
    return ahead.sum(dim=1)


def metrics_from_ranks(ranks: np.ndarray, cutoffs: Sequence[int] = DEFAULT_CUTOFFS) -> dict[str, float]:
    """Recall@K (= hit rate, one target per case) and NDCG@K averaged over cases."""
    ranks = np.asarray(ranks)
    results: dict[str, float] = {}
    for k in cutoffs:
        hit = ranks < k
        results[f"recall_at_{k}"] = float(hit.mean()) if len(ranks) else 0.0
        gains = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
        results[f"ndcg_at_{k}"] = float(gains.mean()) if len(ranks) else 0.0
    return results


def _mask_seen_items(scores: torch.Tensor, histories: Sequence[UserHistory], targets: torch.Tensor) -> None:
    """Push previously seen items (never the target itself) to the bottom, in place."""
    for row, history in enumerate(histories):
        seen = torch.as_tensor(history.items, dtype=torch.long, device=scores.device)
        seen = seen[seen != targets[row]]
        scores[row, seen] = -math.inf


@torch.no_grad()
def rank_targets(
    model: DeltaRecModel,
    cases: Sequence[EvalCase],
    item_text: np.ndarray | torch.Tensor,
    batch_size: int = 1024,
    mask_history: bool = False,
    score_bias: np.ndarray | None = None,
) -> np.ndarray:
    """0-based rank of each case's target among all items by the model's scores.

    Inputs are built exactly as serving builds them (:func:`collate_histories`:
    the last ``max_len`` events of the case's history, aged against the
    target's time). ``score_bias`` (``[n]``, per item index) is added to every
    user's scores: the served popularity prior of items without a learned id
    (:func:`services.model.network.id_less_popularity_prior`). Runs on the
    device the model is on.
    """
    biases = None if score_bias is None else np.asarray(score_bias)[None, :]
    return rank_targets_with_biases(model, cases, item_text, biases, batch_size, mask_history)[0]


def _scored_batches(model: DeltaRecModel, cases: Sequence[EvalCase], item_text: np.ndarray | torch.Tensor,
                    batch_size: int):
    """Per batch of ``cases``: (the cases, the model's scores of every item ``[b, n]``, the
    targets), inputs built as serving builds them (:func:`collate_histories`); the model in eval
    mode meanwhile, on its device."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            item_vectors = model.all_item_vectors(torch.as_tensor(item_text, dtype=torch.float32).to(device))
            for start in range(0, len(cases), batch_size):
                chunk = cases[start : start + batch_size]
                batch = collate_histories(
                    [case.history for case in chunk], [case.target_time for case in chunk], model.config.max_len
                )
                items = torch.from_numpy(batch.items).to(device)
                user_vectors = model.user_vector(
                    items,
                    torch.from_numpy(batch.events).to(device),
                    torch.from_numpy(batch.ages).to(device),
                    history_item_vectors=item_vectors[items],
                    query_ages=torch.from_numpy(batch.query_ages).to(device),
                )
                targets = torch.tensor([case.target_item for case in chunk], dtype=torch.long, device=device)
                yield chunk, model.score(user_vectors, item_vectors), targets
    finally:
        model.train(was_training)


@torch.no_grad()
def rank_targets_with_biases(
    model: DeltaRecModel,
    cases: Sequence[EvalCase],
    item_text: np.ndarray | torch.Tensor,
    score_biases: np.ndarray | None,
    batch_size: int = 1024,
    mask_history: bool = False,
) -> np.ndarray:
    """Ranks ``[b, cases]`` under each of ``b`` per-item score biases (``[b, n]``; None = one
    run without a bias), the user tower run once: comparing prior weights costs one scoring."""
    device = next(model.parameters()).device
    biases = [None] if score_biases is None else [
        torch.as_tensor(row, dtype=torch.float32).to(device) for row in np.asarray(score_biases)]
    ranks: list[list[np.ndarray]] = [[] for _ in biases]
    for chunk, plain, targets in _scored_batches(model, cases, item_text, batch_size):
        for position, bias in enumerate(biases):
            scores = plain + bias if bias is not None else plain
            scores[:, 0] = -math.inf  # padding row is not an item
            if mask_history:
                _mask_seen_items(scores, [case.history for case in chunk], targets)
            ranks[position].append(target_ranks(scores, targets).cpu().numpy())
    return np.stack([np.concatenate(r) if r else np.zeros(0, np.int64) for r in ranks])


@torch.no_grad()
def ranks_with_new_item_slots(
    model: DeltaRecModel,
    cases: Sequence[EvalCase],
    item_text: np.ndarray | torch.Tensor,
    candidates: np.ndarray,
    slot_biases: np.ndarray,
    slots: int,
    k: int = 10,
    score_bias: np.ndarray | None = None,
    batch_size: int = 1024,
    mask_history: bool = False,
) -> np.ndarray:
    """0-based rank of each case's target in the answer the ranker serves with ``slots`` of its
    top ``k`` reserved for new items (services/model/new_items.py, reserve_new_item_slots — the
    same function): ``candidates`` (bool ``[n]``: items without a learned id that have traction)
    ordered among themselves by model score + a row of ``slot_biases`` (``[b, n]``, one row per
    ordering compared). Returns ``[b, cases]``; a target outside the served top k gets
    ``k + its plain rank`` (>= k: a miss at every cutoff up to k). ``score_bias``: added to every
    item's score first (the id-less prior, as rank_targets)."""
    device = next(model.parameters()).device
    base = None if score_bias is None else torch.as_tensor(score_bias, dtype=torch.float32).to(device)
    not_candidate = ~torch.as_tensor(np.asarray(candidates, bool), device=device)
    orders = [torch.as_tensor(row, dtype=torch.float32).to(device) for row in np.asarray(slot_biases)]
    ranks: list[list[np.ndarray]] = [[] for _ in orders]
    for chunk, scores, targets in _scored_batches(model, cases, item_text, batch_size):
        if base is not None:
            scores = scores + base
        scores[:, 0] = -math.inf
        if mask_history:
            _mask_seen_items(scores, [case.history for case in chunk], targets)
        plain_ranks = target_ranks(scores, targets).cpu().numpy()
        ranked = scores.topk(k, dim=1).indices.cpu().numpy()
        target_list = targets.cpu().numpy()
        for position, order in enumerate(orders):
            slot_scores = (scores + order).masked_fill(not_candidate, -math.inf)
            best, best_index = slot_scores.topk(k, dim=1)
            finite = torch.isfinite(best).cpu().numpy()
            best_index = best_index.cpu().numpy()
            out = np.empty(len(chunk), np.int64)
            for row in range(len(chunk)):
                served = reserve_new_item_slots(ranked[row].tolist(), best_index[row][finite[row]].tolist(), k, slots)
                target = int(target_list[row])
                out[row] = served.index(target) if target in served else k + int(plain_ranks[row])
            ranks[position].append(out)
    return np.stack([np.concatenate(r) if r else np.zeros(0, np.int64) for r in ranks])


def evaluate_model(
    model: DeltaRecModel,
    cases: Sequence[EvalCase],
    item_text: np.ndarray | torch.Tensor,
    batch_size: int = 1024,
    mask_history: bool = False,
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
    score_bias: np.ndarray | None = None,
) -> dict[str, float]:
    """Rank each case's target against all items with the model's dot-product scores
    (plus ``score_bias`` per item, see :func:`rank_targets`)."""
    return metrics_from_ranks(
        rank_targets(model, cases, item_text, batch_size, mask_history, score_bias), cutoffs)


def cold_start_items(num_items: int, share: float, seed: int = 0) -> np.ndarray:
    """A seeded random ``share`` of item indexes 1..num_items, sorted: items to keep out of
    training entirely so that they reach the model only through their text, as items created
    after it was trained do."""
    count = int(round(share * num_items))
    chosen = np.random.default_rng(seed).choice(np.arange(1, num_items + 1), size=count, replace=False)
    return np.sort(chosen).astype(np.int64)


def without_items(histories: dict[int, UserHistory], items: np.ndarray) -> dict[int, UserHistory]:
    """``histories`` with every interaction with ``items`` removed (users left empty dropped)."""
    remaining: dict[int, UserHistory] = {}
    for user, history in histories.items():
        keep = ~np.isin(history.items, items)
        if keep.any():
            remaining[user] = UserHistory(history.items[keep], history.events[keep], history.timestamps[keep])
    return remaining


def popularity_counts(histories: Iterable[UserHistory], table_size: int) -> np.ndarray:
    """Interaction count per item index (``[table_size]``, index 0 stays 0)."""
    counts = np.zeros(table_size, np.float64)
    for history in histories:
        np.add.at(counts, history.items, 1.0)
    counts[0] = 0.0
    return counts


def evaluate_popularity(
    cases: Sequence[EvalCase],
    counts: np.ndarray,
    mask_history: bool = False,
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
    batch_size: int = 2048,
) -> dict[str, float]:
    """Most-popular baseline: the same ranking for everyone, by ``counts``.

    Pass counts computed from the data visible at prediction time (each
    case's history), never including the targets.
    """
    base_scores = torch.as_tensor(counts, dtype=torch.float64)
    ranks: list[np.ndarray] = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        scores = base_scores.unsqueeze(0).repeat(len(chunk), 1)
        scores[:, 0] = -math.inf
        targets = torch.tensor([case.target_item for case in chunk], dtype=torch.long)
        if mask_history:
            _mask_seen_items(scores, [case.history for case in chunk], targets)
        ranks.append(target_ranks(scores, targets).numpy())
    return metrics_from_ranks(np.concatenate(ranks) if ranks else np.zeros(0), cutoffs)
