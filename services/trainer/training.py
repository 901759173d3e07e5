"""Full training and incremental (warm-start) updates of :class:`DeltaRecModel`.

Objective: next-interaction prediction with a sampled softmax. Candidates of
a batch are the union of the batch's own targets (in-batch negatives, drawn
proportionally to popularity) and ``num_negatives`` uniformly drawn items.
Each candidate's logit is corrected by the log-probability that it was
included (logQ correction), so the sampled softmax estimates the full softmax
instead of over-penalising popular items. ``num_negatives = -1`` switches to the
exact full softmax over the catalogue.

Plain Python on purpose: no gRPC or database here; the trainer service wires
these functions to its storage.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from services.trainer.batching import collate_windows, iterate_minibatches
from services.trainer.interaction_data import InteractionData, UserHistory
from services.trainer.leave_one_out import EvalCase
from services.trainer.windows import TrainingExample, TrainingWindow, all_next_item_examples, group_into_windows
from services.trainer.evaluation import evaluate_model
from services.model.network import DeltaRecModel, ModelConfig

SELECTION_METRIC = "ndcg_at_10"
# Told (epochs done, epochs of the run) as each epoch starts and ends (the trainer's Status).
EpochProgress = Callable[[int, int], None]


@dataclass
class TrainingStats:
    epochs_run: int = 0
    train_seconds: float = 0.0  # wall time of the whole call, periodic validation included
    validation_seconds: float = 0.0  # part of train_seconds spent evaluating for model selection
    examples: int = 0
    windows: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    validation_history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_validation: dict | None = None
    new_items: int = 0
    replay_examples: int = 0
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # train_full(snapshot_epochs=)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "snapshots"}


DEVICE_SETTINGS = ("auto", "cpu", "cuda")


def resolve_device(setting: str, cuda_available: bool | None = None) -> torch.device:
    """The torch device for a TRAINER_DEVICE value: ``auto`` = CUDA when present, else CPU.

    ``cuda`` on a machine without a usable CUDA device is an error (a setting
    that cannot be honoured must not silently fall back to a 50x slower path).
    """
    if setting not in DEVICE_SETTINGS:
        raise ValueError(f"device must be one of {', '.join(DEVICE_SETTINGS)}, got {setting!r}")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if setting == "cpu" or (setting == "auto" and not cuda_available):
        return torch.device("cpu")
    if not cuda_available:
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return torch.device("cuda")


def seed_everything(seed: int) -> None:
    """Same seed, same threads => bit-identical training on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


class CandidateSampler:
    """In-batch + uniform negatives with their log inclusion probabilities."""

    def __init__(self, target_counts: np.ndarray, num_uniform: int) -> None:
        counts = np.asarray(target_counts, np.float64).copy()
        counts[0] = 0.0
        self.num_items = len(counts) - 1
        # +1 smoothing: items never seen as a target can still be a target later.
        counts[1:] += 1.0
        self.popularity = torch.as_tensor(counts / counts.sum())
        self.num_uniform = num_uniform

    @property
    def is_full_softmax(self) -> bool:
        return self.num_uniform < 0 or self.num_uniform >= self.num_items

    def candidates(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted unique candidate indexes and log P(candidate in the set)."""
        if self.is_full_softmax:
            everything = torch.arange(1, self.num_items + 1)
            return everything, torch.zeros(self.num_items)
        uniform = torch.randint(1, self.num_items + 1, (self.num_uniform,))
        candidates = torch.unique(torch.cat([targets, uniform]))
        popularity = self.popularity[candidates]
        # P(in set) = 1 - P(missed by every in-batch draw) * P(missed by every uniform draw)
        log_missed = len(targets) * torch.log1p(-popularity) + self.num_uniform * math.log1p(
            -1.0 / self.num_items
        )
        log_included = torch.log(-torch.expm1(log_missed)).float()
        return candidates, log_included


def next_item_loss(
    model: DeltaRecModel,
    windows: Sequence[TrainingWindow],
    histories: dict[int, UserHistory],
    item_text: torch.Tensor,
    sampler: CandidateSampler,
) -> torch.Tensor:
    """Mean sampled-softmax cross-entropy over all target positions of a batch.

    Runs on the device of ``item_text`` (the model must be there too).
    """
    device = item_text.device
    batch = collate_windows(windows, histories)
    items = torch.from_numpy(batch.items).to(device)
    input_vectors = model.item_vectors(items, item_text[items])
    outputs = model.encode_sequence(
        input_vectors,
        torch.from_numpy(batch.events).to(device),
        torch.from_numpy(batch.ages).to(device),
        torch.from_numpy(batch.query_ages).to(device),
        items == 0,
    )
    targets = torch.from_numpy(batch.targets).to(device)
    is_target = targets > 0
    queries = outputs[is_target]
    flat_targets = targets[is_target]
    candidates, log_included = sampler.candidates(flat_targets.cpu())
    candidates, log_included = candidates.to(device), log_included.to(device)
    candidate_vectors = model.item_vectors(candidates, item_text[candidates])
    logits = queries @ candidate_vectors.T / model.config.temperature - log_included
    labels = torch.searchsorted(candidates, flat_targets)
    sampled_columns = logits.shape[1]
    if model.config.history_negatives:
        history_logits = _own_history_logits(outputs, input_vectors, items, targets)[is_target]
        logits = torch.cat([logits, history_logits / model.config.temperature], 1)
    return _smoothed_cross_entropy(logits, labels, model.config.label_smoothing, sampled_columns)


def _smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float, smoothing_columns: int
) -> torch.Tensor:
    """Cross-entropy with ``smoothing`` of the target mass spread over the first
    ``smoothing_columns`` columns (the sampled candidates).

    Not ``F.cross_entropy(label_smoothing=...)``: that spreads mass over every column, including
    the masked (-inf) own-history ones, which makes the loss infinite.
    """
    if smoothing <= 0.0:
        return F.cross_entropy(logits, labels)
    log_probabilities = F.log_softmax(logits, dim=1)
    target_term = -log_probabilities.gather(1, labels.unsqueeze(1)).squeeze(1)
    uniform_term = -log_probabilities[:, :smoothing_columns].mean(dim=1)
    return ((1.0 - smoothing) * target_term + smoothing * uniform_term).mean()


def _own_history_logits(
    outputs: torch.Tensor, input_vectors: torch.Tensor, items: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """``[b, t, t]`` scores of each position's query against the items seen up to it.

    Extra softmax columns (not sampled, so no logQ term) that teach the model
    not to re-recommend what the user already has; padding, later positions
    and copies of the target itself are masked out.
    """
    scores = torch.einsum("bjd,bsd->bjs", outputs, input_vectors)
    length = items.shape[1]
    not_yet_seen = torch.ones(length, length, dtype=torch.bool, device=items.device).triu(1).unsqueeze(0)
    excluded = not_yet_seen | (items == 0).unsqueeze(1) | (items.unsqueeze(1) == targets.unsqueeze(2))
    return scores.masked_fill(excluded, float("-inf"))


def _run_epochs(
    model: DeltaRecModel,
    windows: Sequence[TrainingWindow],
    histories: dict[int, UserHistory],
    item_text: torch.Tensor,
    sampler: CandidateSampler,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    stats: TrainingStats,
    progress: bool,
    lr_schedule: str = "constant",
    after_epoch: Callable[[int], bool | None] | None = None,
    on_epoch: EpochProgress | None = None,
    after_step: Callable[[], None] | None = None,
) -> None:
    model.train()
    steps_per_epoch = math.ceil(len(windows) / batch_size)
    scheduler = _learning_rate_scheduler(optimizer, lr_schedule, total_steps=epochs * steps_per_epoch)
    for epoch in range(1, epochs + 1):
        if on_epoch is not None:
            on_epoch(epoch - 1, epochs)
        batches = list(iterate_minibatches(windows, batch_size, rng))
        total_loss = 0.0
        bar = tqdm(batches, desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False)
        for batch_windows in bar:
            loss = next_item_loss(model, batch_windows, histories, item_text, sampler)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            total_loss += loss.item()
        stats.epoch_losses.append(total_loss / max(1, len(batches)))
        stats.epochs_run += 1
        if on_epoch is not None:
            on_epoch(epoch, epochs)
        if after_epoch is not None:
            keep_going = after_epoch(epoch)
            model.train()
            if keep_going is False:
                break


def _learning_rate_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant, or cosine decay from the base rate to 10% of it over the run."""
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if schedule == "cosine":
        floor = 0.1

        def cosine(step: int) -> float:
            progress = min(1.0, step / max(1, total_steps))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    raise ValueError(f"unknown lr_schedule {schedule!r}")


def _target_counts(histories: dict[int, UserHistory], table_size: int) -> np.ndarray:
    counts = np.zeros(table_size, np.float64)
    for history in histories.values():
        np.add.at(counts, history.items[1:], 1.0)
    return counts


def _occurrence_counts(histories: dict[int, UserHistory], table_size: int) -> np.ndarray:
    """Interactions per item index, inputs and targets alike (index 0 counts as seen)."""
    counts = np.zeros(table_size, np.int64)
    for history in histories.values():
        np.add.at(counts, history.items, 1)
    counts[0] = 1
    return counts


@contextlib.contextmanager
def _unseen_ids_reset(model: DeltaRecModel, never_seen: torch.Tensor):
    """Evaluate as the finished model will score: unseen items through their text only."""
    saved = model.item_id_embedding.weight.detach().clone()
    model.reset_item_ids(never_seen.to(saved.device))
    try:
        yield
    finally:
        with torch.no_grad():
            model.item_id_embedding.weight.copy_(saved)


def train_full(
    data: InteractionData,
    config: ModelConfig,
    seed: int = 0,
    epochs: int | None = None,
    progress: bool = True,
    histories: dict[int, UserHistory] | None = None,
    validation: Sequence[EvalCase] | None = None,
    eval_every: int = 4,
    on_epoch: EpochProgress | None = None,
    device: torch.device | str = "cpu",
    patience: int | None = None,
    stop_after_epoch: int | None = None,
    snapshot_epochs: Sequence[int] = (),
) -> tuple[DeltaRecModel, TrainingStats]:
    """Train from scratch on every next-item prefix of ``histories``.

    ``histories`` defaults to ``data.histories``; pass the training part of a
    split to hold targets out. If ``validation`` cases are given the model is
    evaluated every ``eval_every`` epochs and the best state by validation
    NDCG@10 is returned (early stopping on validation, never on test); with
    ``patience`` training stops after that many evaluations without a new best.
    ``stop_after_epoch`` ends the run there while keeping the learning-rate
    schedule of ``epochs``: a refit on more data then retraces exactly the
    trajectory of the checkpoint validation picked. ``snapshot_epochs``: the CPU state dicts
    (unseen items already reset to row 0, as the returned model would be) at those epochs go to
    ``stats.snapshots``, so that one run can serve whichever epoch a concurrent selection run
    picks: the state at epoch e is exactly what ``stop_after_epoch=e`` returns.
    Training runs on ``device``; the model is returned on the CPU (artifacts,
    serving and the gate work there).

    Items that never occur in ``histories`` end with id row 0 ("no learned
    id"): they only ever met the loss as negatives, so their own row would just
    push them down; row 0 scores them by text, the path id dropout trained.
    """
    seed_everything(seed)
    device = torch.device(device)
    epochs = config.epochs if epochs is None else epochs
    histories = data.histories if histories is None else histories
    data.ensure_item_text_rows()
    item_text = torch.as_tensor(data.item_text, dtype=torch.float32).to(device)
    model = DeltaRecModel(config, num_items=data.num_items).to(device)
    examples = all_next_item_examples(histories)
    windows = group_into_windows(examples, config.max_len)
    sampler = CandidateSampler(_target_counts(histories, data.item_ids.table_size), config.num_negatives)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    stats = TrainingStats(examples=len(examples), windows=len(windows))
    best_state: dict | None = None

    never_seen = torch.from_numpy(_occurrence_counts(histories, data.item_ids.table_size) == 0)

    def validate(epoch: int) -> bool:
        """Evaluate when due; False = stop (patience exhausted or the requested last epoch)."""
        nonlocal best_state
        if epoch in snapshot_epochs:
            with _unseen_ids_reset(model, never_seen):
                stats.snapshots[epoch] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            return False
        if not validation or (epoch % eval_every and epoch != epochs):
            return True
        evaluation_started = time.perf_counter()
        with _unseen_ids_reset(model, never_seen):
            figures = evaluate_model(model, validation, item_text)
            # recorded beside the selection figures: the protocol of the rows that filter seen items
            masked = evaluate_model(model, validation, item_text, mask_history=True)
        figures.update({f"history_masked_{name}": value for name, value in masked.items()})
        stats.validation_seconds += time.perf_counter() - evaluation_started
        stats.validation_history.append({"epoch": epoch, **figures})
        if progress:
            tqdm.write(f"epoch {epoch}: loss {stats.epoch_losses[-1]:.4f} validation {_brief(figures)}")
        best = stats.best_validation
        if best is None or figures[SELECTION_METRIC] > best[SELECTION_METRIC]:
            stats.best_validation, stats.best_epoch = figures, epoch
            best_state = copy.deepcopy(model.state_dict())
        since_best = sum(1 for entry in stats.validation_history if entry["epoch"] > stats.best_epoch)
        return patience is None or since_best < patience

    started = time.perf_counter()
    _run_epochs(
        model, windows, histories, item_text, sampler, optimizer, epochs, config.batch_size,
        np.random.default_rng(seed), stats, progress, config.lr_schedule, validate, on_epoch,
    )
    if best_state is not None:
        model.load_state_dict(best_state)
    model.reset_item_ids(never_seen.to(device))
    stats.train_seconds = time.perf_counter() - started
    model.eval()
    return model.cpu(), stats


REPLAY_SOURCES = ("own_history", "uniform")


@dataclass(frozen=True)
class IncrementalPolicy:
    """How a warm-start update limits drift from the model it starts from.

    * ``anchor``: after every optimizer step each weight moves this fraction of its distance back
      toward the parent's value (a decoupled L2 pull, "EWC-lite" without the Fisher weights): the
      chain cannot wander far from the weights the full training found.
    * ``parent_weight``: when training ends, weights = parent_weight * parent + (1 - parent_weight)
      * fine-tuned (weight averaging with the previous version; 0 = keep the fine-tuned weights).
    * ``freeze_items``: only the id rows of the new examples' target items (and rows grown by the
      update itself) move; every other item's id row stays as the parent left it.
    * ``replay_from``: where the replayed old examples come from (see ``replay_examples``):
      ``own_history`` (default) = first the earlier targets of the users with new examples that
      lie inside the encoder windows the new examples need anyway, so replaying them costs no
      extra encoder pass; only what they cannot supply is drawn uniformly from the other
      prefixes. ``uniform`` = all of it uniformly from every other prefix (each a window of its
      own: about twice the update's training time at replay ratio 1).

    Grown rows (new items) count as the parent's row 0 (their text-only start) for the pull and
    the average.
    """

    anchor: float = 0.0
    parent_weight: float = 0.0
    freeze_items: bool = False
    replay_from: str = "own_history"

    def validate(self) -> "IncrementalPolicy":
        if not 0.0 <= self.anchor < 1.0:
            raise ValueError(f"anchor must be in [0, 1), got {self.anchor}")
        if not 0.0 <= self.parent_weight < 1.0:
            raise ValueError(f"parent_weight must be in [0, 1), got {self.parent_weight}")
        if self.replay_from not in REPLAY_SOURCES:
            raise ValueError(f"replay_from must be one of {', '.join(REPLAY_SOURCES)}, got {self.replay_from!r}")
        return self

    @property
    def needs_parent(self) -> bool:
        return self.anchor > 0.0 or self.parent_weight > 0.0


def _changed_item_rows(examples: Sequence[TrainingExample], histories: dict[int, UserHistory],
                       table_size: int, first_new_row: int) -> torch.Tensor:
    """Bool mask of the id rows an update with ``freeze_items`` may move: new rows and the items
    of the new examples' targets."""
    changed = torch.zeros(table_size, dtype=torch.bool)
    changed[first_new_row:] = True
    targets = [int(histories[e.user].items[e.target_position]) for e in examples]
    if targets:
        changed[torch.tensor(targets, dtype=torch.long)] = True
    changed[0] = False  # the "no learned id" row every unseen item shares
    return changed


def replay_examples(histories: dict[int, UserHistory], new_examples: Sequence[TrainingExample], count: int,
                    max_len: int, source: str, rng: np.random.Generator) -> list[TrainingExample]:
    """``count`` old next-item examples (never one of ``new_examples``), drawn without replacement.

    ``uniform``: uniformly from every other prefix of every history (one encoder window each).
    ``own_history``: first uniformly from the other targets inside the windows
    ``group_into_windows`` builds for ``new_examples`` (a window covers up to ``max_len``
    positions before its last target; the earlier targets there ride the same encoder pass, and
    ``group_into_windows`` packs them into it because the windows' last targets do not change),
    then, when those are fewer than ``count``, the rest uniformly from all other prefixes.

    Vectorised over a flat index of all prefixes (users in sorted order, positions 1..len-1 each:
    the order of ``all_next_item_examples``), so a sample over 10^5-10^6 interactions costs no
    Python loop over them.
    """
    users = np.array(sorted(histories), np.int64)
    targets_per_user = np.array([max(0, len(histories[int(u)]) - 1) for u in users], np.int64)
    offsets = np.concatenate([[0], np.cumsum(targets_per_user)])
    total = int(offsets[-1])
    count = max(0, count)
    if count == 0 or total == 0:
        return []
    row_of = {int(u): row for row, u in enumerate(users)}

    def flat(user: int, positions) -> np.ndarray:
        return offsets[row_of[user]] + np.asarray(positions, np.int64) - 1

    available = np.ones(total, bool)
    new_positions = [e for e in new_examples if e.target_position >= 1 and e.user in row_of]
    for example in new_positions:
        available[flat(example.user, [example.target_position])] = False
    chosen = np.zeros(0, np.int64)
    if source == "own_history":
        inside = np.zeros(total, bool)
        for window in group_into_windows(new_positions, max_len):
            inside[flat(window.user, np.arange(window.start + 1, window.end + 1))] = True
        own = np.flatnonzero(inside & available)
        chosen = own[rng.choice(len(own), size=min(count, len(own)), replace=False)] if len(own) else chosen
        available[chosen] = False
    elif source != "uniform":
        raise ValueError(f"replay_from must be one of {', '.join(REPLAY_SOURCES)}, got {source!r}")
    remaining = min(count - len(chosen), int(available.sum()))
    if remaining > 0:
        others = np.flatnonzero(available)
        chosen = np.concatenate([chosen, others[rng.choice(len(others), size=remaining, replace=False)]])
    rows = np.searchsorted(offsets, chosen, side="right") - 1
    positions = chosen - offsets[rows] + 1
    return [TrainingExample(int(users[row]), int(position)) for row, position in zip(rows, positions)]


def update_incremental(
    model: DeltaRecModel,
    all_data: InteractionData,
    selected_new_examples: Sequence[TrainingExample],
    replay_ratio: float = 1.0,
    seed: int = 0,
    epochs: int | None = None,
    learning_rate: float | None = None,
    progress: bool = False,
    on_epoch: EpochProgress | None = None,
    device: torch.device | str = "cpu",
    policy: IncrementalPolicy = IncrementalPolicy(),
) -> TrainingStats:
    """Warm-start fine-tune ``model`` in place on new data plus a replay sample.

    * The item-id table is grown first to ``all_data``'s item count; new rows
      start as copies of row 0, i.e. at the text-only vector of the new item. (The model
      has no per-user parameters: new users only need their history.)
    * ``selected_new_examples`` are next-item targets in ``all_data.histories``
      chosen by the caller (e.g. events since the last run, filtered).
    * ``replay_ratio`` old examples per new one are replayed (``replay_examples``, from where
      ``policy.replay_from`` says), which limits forgetting of what the model already knew.
    * ``policy``: pull toward / averaging with the parent, frozen id rows (IncrementalPolicy).
    * Trains on ``device`` and leaves the model on the CPU.
    """
    config = model.config
    policy.validate()
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    all_data.ensure_item_text_rows()
    first_new_row = model.num_items + 1
    new_items = all_data.num_items - model.num_items
    model.grow_items(new_items)
    device = torch.device(device)
    item_text = torch.as_tensor(all_data.item_text, dtype=torch.float32).to(device)

    selected = {(e.user, e.target_position) for e in selected_new_examples}
    new_examples = [TrainingExample(user, position) for user, position in sorted(selected)]
    replay = replay_examples(all_data.histories, new_examples, int(round(replay_ratio * len(selected))),
                             config.max_len, policy.replay_from, rng)
    replay_count = len(replay)
    examples = new_examples + replay
    windows = group_into_windows(examples, config.max_len)
    stats = TrainingStats(
        examples=len(examples), windows=len(windows), new_items=max(0, new_items), replay_examples=replay_count
    )
    if not windows:
        return stats
    model.to(device)
    parent = ({name: p.detach().clone() for name, p in model.named_parameters()} if policy.needs_parent else {})

    def pull_toward_parent() -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.sub_(policy.anchor * (p - parent[name]))

    hook = None
    if policy.freeze_items:
        movable = _changed_item_rows(new_examples, all_data.histories, model.num_items + 1,
                                     first_new_row).to(device).unsqueeze(1)
        hook = model.item_id_embedding.weight.register_hook(lambda grad: grad * movable)
    sampler = CandidateSampler(
        _target_counts(all_data.histories, all_data.item_ids.table_size), config.num_negatives
    )
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=config.incremental_learning_rate if learning_rate is None else learning_rate,
        weight_decay=config.weight_decay,
    )
    started = time.perf_counter()
    try:
        _run_epochs(
            model, windows, all_data.histories, item_text, sampler, optimizer,
            config.incremental_epochs if epochs is None else epochs, config.batch_size, rng, stats, progress,
            on_epoch=on_epoch, after_step=pull_toward_parent if policy.anchor > 0.0 else None,
        )
    finally:
        if hook is not None:
            hook.remove()
    if policy.parent_weight > 0.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.mul_(1.0 - policy.parent_weight).add_(policy.parent_weight * parent[name])
    stats.train_seconds = time.perf_counter() - started
    model.eval()
    model.cpu()
    return stats


def _brief(figures: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.4f}" for name, value in sorted(figures.items()))
