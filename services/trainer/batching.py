"""Interaction containers, id maps, the Amazon-Beauty loader and batching.

Conventions shared with :mod:`services.model.network`:

* Item and user indexes are contiguous ints starting at 1; index 0 is reserved
  (padding in sequences, "no learned id" in the item-id embedding table).
* Event types are small ints (:class:`EventType`), 0 = padding.
* Timestamps are seconds (float). Ages are "seconds before the prediction time".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from services.contracts.event_types import EventType

SECONDS_PER_DAY = 86_400.0
# Beauty has no timestamps in our copy; one synthetic day between consecutive
# events of a user keeps ages meaningful (age in days == distance in events).
BEAUTY_SYNTHETIC_STEP_SECONDS = SECONDS_PER_DAY
BEAUTY_SYNTHETIC_START = 1_300_000_000.0


class IdMap:
    """Bijection between external string ids and contiguous indexes 1..n.

    Index 0 is never handed out (it means padding / unknown). Indexes are only
    ever appended, so an index, once given, keeps its meaning forever: this is
    what lets an incrementally updated model keep its embedding rows.
    """

    def __init__(self, external_ids: Iterable[str] = ()) -> None:
        self._index_of: dict[str, int] = {}
        self._external_of: list[str | None] = [None]  # slot 0 reserved
        for external_id in external_ids:
            self.add(external_id)

    def add(self, external_id: str) -> int:
        """Return the index of ``external_id``, assigning the next free one if new."""
        key = str(external_id)
        index = self._index_of.get(key)
        if index is None:
            index = len(self._external_of)
            self._index_of[key] = index
            self._external_of.append(key)
        return index

    def get(self, external_id: str, default: int = 0) -> int:
        """Index of ``external_id`` or ``default`` (0 = unknown) without growing."""
        return self._index_of.get(str(external_id), default)

    def external(self, index: int) -> str:
        if index <= 0 or index >= len(self._external_of):
            raise KeyError(index)
        return self._external_of[index]  # type: ignore[return-value]

    def __contains__(self, external_id: object) -> bool:
        return str(external_id) in self._index_of

    def __len__(self) -> int:
        """Number of real ids (excluding the reserved 0)."""
        return len(self._external_of) - 1

    @property
    def table_size(self) -> int:
        """Rows an embedding table needs to hold every index (n + 1)."""
        return len(self._external_of)

    def external_ids(self) -> list[str]:
        """External ids in index order (index 1 first)."""
        return list(self._external_of[1:])  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.external_ids())

    @classmethod
    def from_json(cls, text: str) -> "IdMap":
        return cls(json.loads(text))


@dataclass
class UserHistory:
    """One user's interactions in time order, as parallel numpy arrays."""

    items: np.ndarray  # int64 item indexes
    events: np.ndarray  # int64 EventType values
    timestamps: np.ndarray  # float64 seconds

    @classmethod
    def empty(cls) -> "UserHistory":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def head(self, length: int) -> "UserHistory":
        """The first ``length`` interactions (negative = drop from the end)."""
        return UserHistory(self.items[:length], self.events[:length], self.timestamps[:length])

    def append(self, item: int, event: int, timestamp: float) -> None:
        """Insert keeping time order; equal timestamps keep arrival order."""
        position = int(np.searchsorted(self.timestamps, timestamp, side="right"))
        self.items = np.insert(self.items, position, item)
        self.events = np.insert(self.events, position, event)
        self.timestamps = np.insert(self.timestamps, position, timestamp)


@dataclass
class InteractionData:
    """All interactions plus the id maps and per-item text vectors.

    ``item_text`` has one row per item index (row 0 unused, zeros); services
    fill it from :class:`services.common.text_encoder.TextEncoder`.
    """

    item_ids: IdMap = field(default_factory=IdMap)
    user_ids: IdMap = field(default_factory=IdMap)
    histories: dict[int, UserHistory] = field(default_factory=dict)
    item_text: np.ndarray = field(default_factory=lambda: np.zeros((1, 384), np.float32))

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def add_interaction(
        self, user_id: str, item_id: str, event: EventType | str | int, timestamp: float
    ) -> tuple[int, int]:
        """Record one event (growing the id maps); return (user index, item index)."""
        user_index = self.user_ids.add(user_id)
        item_index = self.item_ids.add(item_id)
        history = self.histories.setdefault(user_index, UserHistory.empty())
        history.append(item_index, int(EventType.parse(event)), float(timestamp))
        return user_index, item_index

    def set_item_text(self, item_index: int, vector: np.ndarray) -> None:
        """Store an item's text vector, growing the matrix to the id map size."""
        self.ensure_item_text_rows()
        self.item_text[item_index] = vector

    def ensure_item_text_rows(self) -> None:
        missing_rows = self.item_ids.table_size - self.item_text.shape[0]
        if missing_rows > 0:
            padding = np.zeros((missing_rows, self.item_text.shape[1]), np.float32)
            self.item_text = np.concatenate([self.item_text, padding])

    def interaction_count(self) -> int:
        return sum(len(history) for history in self.histories.values())


# ---------------------------------------------------------------------------
# Amazon Beauty
# ---------------------------------------------------------------------------


@dataclass
class BeautyCatalog:
    """items.tsv: internal dataset id -> (asin, title)."""

    asin_of: dict[str, str]
    title_of: dict[str, str]


def read_beauty_catalog(data_dir: str | Path) -> BeautyCatalog:
    asin_of: dict[str, str] = {}
    title_of: dict[str, str] = {}
    with open(Path(data_dir) / "items.tsv", encoding="utf-8") as handle:
        next(handle)  # header: item_id asin title
        for line in handle:
            parts = line.rstrip("\n").split("\t", 2)
            item_id = parts[0]
            asin_of[item_id] = parts[1] if len(parts) > 1 else ""
            title_of[item_id] = parts[2] if len(parts) > 2 else ""
    return BeautyCatalog(asin_of, title_of)


def load_beauty(
    data_dir: str | Path,
    max_users: int | None = None,
    register_full_catalog: bool = True,
) -> tuple[InteractionData, list[str]]:
    """Load sequences.txt into :class:`InteractionData` (text not filled yet).

    Every event is a PURCHASE (reviews are the proxy for purchases) and
    timestamps are synthetic: one day apart, increasing within a user.
    With ``register_full_catalog`` every item of items.tsv gets an index in
    dataset-id order, so metrics rank against the whole catalogue even when
    only ``max_users`` users are loaded.

    Returns the data and the titles aligned with item indexes 1..n
    (``titles[i - 1]`` is the title of item index ``i``).
    """
    catalog = read_beauty_catalog(data_dir)
    data = InteractionData()
    if register_full_catalog:
        for item_id in sorted(catalog.title_of, key=int):
            data.item_ids.add(item_id)
    with open(Path(data_dir) / "sequences.txt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle):
            if max_users is not None and line_number >= max_users:
                break
            user_id, *item_ids = line.split()
            user_index = data.user_ids.add(user_id)
            items = np.array([data.item_ids.add(item_id) for item_id in item_ids], np.int64)
            data.histories[user_index] = UserHistory(
                items=items,
                events=np.full(len(items), int(EventType.PURCHASE), np.int64),
                timestamps=BEAUTY_SYNTHETIC_START
                + BEAUTY_SYNTHETIC_STEP_SECONDS * np.arange(len(items), dtype=np.float64),
            )
    titles = [catalog.title_of.get(item_id, "") for item_id in data.item_ids.external_ids()]
    data.ensure_item_text_rows()
    return data, titles


def cached_text_embeddings(
    titles: Sequence[str],
    cache_dir: str | Path,
    model_name: str,
    encode: Callable[[Sequence[str]], np.ndarray],
) -> np.ndarray:
    """Embeddings for ``titles``, memoised on disk by a hash of titles + model.

    ``encode`` is only called on a cache miss (it is typically
    ``TextEncoder().encode``), so the expensive model load can be deferred.
    """
    digest = hashlib.sha256(model_name.encode("utf-8"))
    for title in titles:
        digest.update(b"\x00" + title.encode("utf-8"))
    path = Path(cache_dir) / f"text_emb_{digest.hexdigest()[:24]}.npy"
    if path.is_file():
        cached = np.load(path)
        if cached.shape[0] == len(titles):
            return cached
    vectors = np.asarray(encode(titles), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.npy")
    np.save(temporary, vectors)
    temporary.replace(path)  # atomic: a concurrent reader never sees half a file
    return vectors


# ---------------------------------------------------------------------------
# Leave-one-out split
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalCase:
    """Predict ``target_item`` for ``user`` given ``history`` (strictly earlier)."""

    user: int
    history: UserHistory
    target_item: int
    target_time: float


@dataclass
class LeaveOneOutSplit:
    """Standard sequential-recommendation split.

    train: each user's sequence without its last two items;
    validation: predict the second-to-last from train;
    test: predict the last from train + the validation item.
    Users with fewer than 3 interactions only contribute training data.
    """

    train: dict[int, UserHistory]
    validation: list[EvalCase]
    test: list[EvalCase]


def leave_one_out_split(histories: dict[int, UserHistory]) -> LeaveOneOutSplit:
    train: dict[int, UserHistory] = {}
    validation: list[EvalCase] = []
    test: list[EvalCase] = []
    for user in sorted(histories):
        history = histories[user]
        if len(history) < 3:
            train[user] = history
            continue
        train[user] = history.head(-2)
        validation.append(
            EvalCase(user, history.head(-2), int(history.items[-2]), float(history.timestamps[-2]))
        )
        test.append(
            EvalCase(user, history.head(-1), int(history.items[-1]), float(history.timestamps[-1]))
        )
    return LeaveOneOutSplit(train, validation, test)


# ---------------------------------------------------------------------------
# Next-item training examples and batches
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingExample:
    """Predict ``history.items[target_position]`` from everything before it."""

    user: int
    target_position: int


@dataclass(frozen=True)
class TrainingWindow:
    """A contiguous slice of one user's history fed through the causal encoder.

    Inputs are positions ``[start, end)``; the output at input position ``p``
    predicts position ``p + 1``. Only positions listed in ``target_positions``
    (all within ``(start, end]``) contribute to the loss, so one window serves
    several prefix examples at the cost of a single encoder pass.
    """

    user: int
    start: int
    end: int
    target_positions: tuple[int, ...]


def all_next_item_examples(histories: dict[int, UserHistory]) -> list[TrainingExample]:
    """Every prefix of every sequence: targets at positions 1..len-1."""
    return [
        TrainingExample(user, position)
        for user in sorted(histories)
        for position in range(1, len(histories[user]))
    ]


def group_into_windows(
    examples: Iterable[TrainingExample], max_len: int
) -> list[TrainingWindow]:
    """Pack examples into as few windows as possible, each with <= max_len inputs.

    Working backwards from a user's latest target, a window ending right before
    it covers every other target within the previous ``max_len`` positions with
    at most ``max_len`` items of context, exactly the context a per-example
    truncation would give for the latest one and at least
    ``min(position, max_len - distance)`` for the others.
    """
    positions_by_user: dict[int, list[int]] = {}
    for example in examples:
        if example.target_position < 1:
            continue  # nothing to condition on
        positions_by_user.setdefault(example.user, []).append(example.target_position)
    windows: list[TrainingWindow] = []
    for user in sorted(positions_by_user):
        remaining = sorted(set(positions_by_user[user]))
        while remaining:
            last_target = remaining[-1]
            start = max(0, last_target - max_len)
            covered = tuple(p for p in remaining if p > start)
            remaining = [p for p in remaining if p <= start]
            windows.append(TrainingWindow(user, start, last_target, covered))
    return windows


@dataclass
class SequenceBatch:
    """Left-padded model inputs; column -1 is the most recent input event.

    ``ages`` are seconds between each input event and the batch row's
    reference time; ``query_ages`` give, per position, the age of the moment the
    prediction at that position is made for (the next event's age in training,
    0 = "now" at inference). ``targets`` holds the item to predict at each
    position, 0 where that position is not a training target.
    """

    items: np.ndarray  # [b, t] int64
    events: np.ndarray  # [b, t] int64
    ages: np.ndarray  # [b, t] float32
    query_ages: np.ndarray  # [b, t] float32
    targets: np.ndarray  # [b, t] int64

    @property
    def padding_mask(self) -> np.ndarray:
        return self.items == 0


def collate_windows(
    windows: Sequence[TrainingWindow], histories: dict[int, UserHistory]
) -> SequenceBatch:
    """Build a batch padded to the longest window in it (not to max_len)."""
    width = max(window.end - window.start for window in windows)
    shape = (len(windows), width)
    batch = SequenceBatch(
        items=np.zeros(shape, np.int64),
        events=np.zeros(shape, np.int64),
        ages=np.zeros(shape, np.float32),
        query_ages=np.zeros(shape, np.float32),
        targets=np.zeros(shape, np.int64),
    )
    for row, window in enumerate(windows):
        history = histories[window.user]
        length = window.end - window.start
        columns = slice(width - length, width)
        # Reference = time of the last target, so ages stay small and >= 0.
        reference_time = history.timestamps[window.end]
        batch.items[row, columns] = history.items[window.start : window.end]
        batch.events[row, columns] = history.events[window.start : window.end]
        batch.ages[row, columns] = reference_time - history.timestamps[window.start : window.end]
        batch.query_ages[row, columns] = (
            reference_time - history.timestamps[window.start + 1 : window.end + 1]
        )
        for position in window.target_positions:
            batch.targets[row, width - 1 - (window.end - position)] = history.items[position]
    return batch


def collate_histories(
    histories: Sequence[UserHistory], now: Sequence[float], max_len: int
) -> SequenceBatch:
    """Inference batch: the last ``max_len`` events of each history, aged vs ``now``.

    Empty histories give an all-padding row; the model then falls back to its
    "no history" vector.
    """
    width = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    shape = (len(histories), width)
    batch = SequenceBatch(
        items=np.zeros(shape, np.int64),
        events=np.zeros(shape, np.int64),
        ages=np.zeros(shape, np.float32),
        query_ages=np.zeros(shape, np.float32),
        targets=np.zeros(shape, np.int64),
    )
    for row, (history, now_time) in enumerate(zip(histories, now)):
        recent = history.items[-max_len:]
        length = len(recent)
        if length == 0:
            continue
        columns = slice(width - length, width)
        ages = (now_time - history.timestamps[-length:]).astype(np.float32)
        batch.items[row, columns] = recent
        batch.events[row, columns] = history.events[-length:]
        batch.ages[row, columns] = ages
        # Position p predicts what followed it: its query moment is the next
        # event's time; the last position predicts "now".
        batch.query_ages[row, columns] = np.append(ages[1:], 0.0)
    return batch


def iterate_minibatches(
    windows: Sequence[TrainingWindow], batch_size: int, rng: np.random.Generator
) -> Iterator[list[TrainingWindow]]:
    """Shuffled minibatches of windows, grouped loosely by length.

    Sorting inside large shuffled chunks keeps padding low (Beauty sequences are
    mostly short) while every epoch still sees a different order.
    """
    order = rng.permutation(len(windows))
    chunk = batch_size * 50
    batches: list[list[TrainingWindow]] = []
    for chunk_start in range(0, len(order), chunk):
        chunk_windows = [windows[i] for i in order[chunk_start : chunk_start + chunk]]
        chunk_windows.sort(key=lambda w: w.end - w.start)
        batches.extend(
            chunk_windows[i : i + batch_size] for i in range(0, len(chunk_windows), batch_size)
        )
    for index in rng.permutation(len(batches)):
        yield batches[index]
