"""Every data set of the project, for `make run`, the benchmarks and the tests; no service
imports this module (services learn only from what arrives through their APIs).

* Amazon Beauty (`../shared/data/amazon-beauty/`, or `$DELTAREC_DATA_DIR/amazon-beauty/`; read
  only, never copied): `items.tsv` (id, asin, title) and `sequences.txt` (a user, then the
  user's items in time order) are read once here, and given in two shapes:
  - `load_beauty()`: a `Dataset` (catalog + sequences) that `make run` and the serving
    benchmarks replay as live traffic through the collector;
  - `load_beauty_interactions()`: the trainer's `InteractionData` (every event a purchase, one
    synthetic day apart) for the offline model benchmarks (bench/accuracy.py, bench/incremental.py).
* `synthetic()`: a small catalog and traffic when the Beauty folder is absent, so everything runs.
* `structured_interactions()` / `structured_catalog()`: a small interaction set with structure a
  tiny model learns in seconds, for the trainer's tests and drills.
* `cached_text_embeddings()`: MiniLM vectors of many titles, memoised on disk (.cache/).
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from services.contracts.event_types import EventType
from services.trainer.interaction_log import Interaction
from services.trainer.interaction_data import InteractionData, UserHistory

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = Path(os.environ.get("DELTAREC_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
SECONDS_PER_DAY = 86_400.0
# Beauty has no timestamps in our copy; one synthetic day between consecutive
# events of a user keeps ages meaningful (age in days == distance in events).
BEAUTY_SYNTHETIC_STEP_SECONDS = SECONDS_PER_DAY
BEAUTY_SYNTHETIC_START = 1_300_000_000.0


@dataclass(frozen=True)
class CatalogItem:
    item_id: str
    title: str
    category: str = ""
    brand: str = ""


@dataclass
class Dataset:
    name: str
    items: list[CatalogItem]
    # user id -> item ids in time order
    sequences: dict[str, list[str]]

    @property
    def interactions(self) -> int:
        return sum(len(items) for items in self.sequences.values())

    def replay_order(self) -> list[tuple[str, str]]:
        """(user, item) pairs as live traffic: each user's order is real, users interleave
        round-robin (the data carries order, not timestamps)."""
        cursors = {user: 0 for user in self.sequences}
        order: list[tuple[str, str]] = []
        active = list(self.sequences)
        while active:
            still = []
            for user in active:
                position = cursors[user]
                order.append((user, self.sequences[user][position]))
                cursors[user] = position + 1
                if position + 1 < len(self.sequences[user]):
                    still.append(user)
            active = still
        return order


def beauty_dir(data_dir: Path | None = None) -> Path:
    return Path(data_dir or DEFAULT_DATA_DIR) / "amazon-beauty"


@dataclass
class BeautyCatalog:
    """items.tsv: internal dataset id -> (asin, title), titles exactly as in the file."""

    asin_of: dict[str, str]
    title_of: dict[str, str]


def read_beauty_catalog(folder: str | Path) -> BeautyCatalog:
    asin_of: dict[str, str] = {}
    title_of: dict[str, str] = {}
    with open(Path(folder) / "items.tsv", encoding="utf-8") as handle:
        next(handle)  # header: item_id asin title
        for line in handle:
            parts = line.rstrip("\n").split("\t", 2)
            item_id = parts[0]
            asin_of[item_id] = parts[1] if len(parts) > 1 else ""
            title_of[item_id] = parts[2] if len(parts) > 2 else ""
    return BeautyCatalog(asin_of, title_of)


def read_beauty_sequences(folder: str | Path, max_users: int | None = None) -> dict[str, list[str]]:
    """user -> item ids in time order, in file order (the first `max_users` users)."""
    sequences: dict[str, list[str]] = {}
    with open(Path(folder) / "sequences.txt", encoding="utf-8") as handle:
        for line in handle:
            if max_users is not None and len(sequences) >= max_users:
                break
            parts = line.split()
            if len(parts) >= 2:
                sequences[parts[0]] = parts[1:]
    return sequences


def load_beauty(data_dir: Path | None = None, max_users: int | None = None) -> Dataset:
    folder = beauty_dir(data_dir)
    catalog = read_beauty_catalog(folder)
    items = [CatalogItem(item_id, title.strip(), category="Beauty") for item_id, title in catalog.title_of.items()]
    return Dataset("amazon-beauty", items, read_beauty_sequences(folder, max_users))


def load_beauty_interactions(
    folder: str | Path,
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
    catalog = read_beauty_catalog(folder)
    data = InteractionData()
    if register_full_catalog:
        for item_id in sorted(catalog.title_of, key=int):
            data.item_ids.add(item_id)
    for user_id, item_ids in read_beauty_sequences(folder, max_users).items():
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


_ADJECTIVES = ["Hydrating", "Matte", "Organic", "Gentle", "Radiant", "Volumizing", "Soothing",
               "Long-Lasting", "Brightening", "Nourishing", "Waterproof", "Fragrance-Free"]
_PRODUCTS = ["Face Cream", "Lip Balm", "Shampoo", "Conditioner", "Mascara", "Eyeliner", "Serum",
             "Body Lotion", "Nail Polish", "Foundation", "Cleanser", "Sunscreen SPF 50", "Hair Oil"]
_BRANDS = ["Lumiere", "Verdant", "Aurora", "Belle Rose", "Nordic Glow", "Sahara", "Kiko Labs"]
_CATEGORIES = ["Skin Care", "Hair Care", "Makeup", "Fragrance", "Bath & Body"]


def synthetic(n_items: int = 400, n_users: int = 300, seed: int = 7) -> Dataset:
    """A small catalog with realistic titles and traffic with some structure (users stick to a
    few categories), for machines without the shared data sets."""
    rng = random.Random(seed)
    items = []
    for index in range(n_items):
        brand, product = rng.choice(_BRANDS), rng.choice(_PRODUCTS)
        title = f"{brand} {rng.choice(_ADJECTIVES)} {product} {rng.choice(['30 ml', '50 ml', '100 ml', 'Set of 2'])}"
        items.append(CatalogItem(f"S{index:05d}", title, category=rng.choice(_CATEGORIES), brand=brand))
    by_category: dict[str, list[str]] = {}
    for item in items:
        by_category.setdefault(item.category, []).append(item.item_id)
    sequences = {}
    for user in range(n_users):
        favourites = rng.sample(_CATEGORIES, 2)
        length = rng.randint(5, 30)
        sequences[f"U{user:05d}"] = [rng.choice(by_category[rng.choice(favourites)]) for _ in range(length)]
    return Dataset("synthetic", items, sequences)


def load_default(max_users: int | None = None) -> Dataset:
    """Amazon Beauty when ../shared/data has it, else synthetic."""
    if (beauty_dir() / "sequences.txt").exists():
        return load_beauty(max_users=max_users)
    return synthetic()


# ---------------------------------------------------------------------------- structured (tests, drills)
#
# Items form clusters; each user stays in one cluster and mostly walks it in order (the next item
# follows the previous one), so a model that learned anything ranks the true next item near the
# top, the popularity baseline does not, and a model with negated scores ranks it near the bottom.

STRUCTURED_T0 = 1_700_000_000.0


def structured_item_id(cluster: int, position: int, prefix: str = "I") -> str:
    return f"{prefix}{cluster:02d}-{position:02d}"


def structured_interactions(n_users: int = 60, n_clusters: int = 8, cluster_size: int = 8, per_user: int = 12,
                            seed: int = 7, start: float = STRUCTURED_T0, user_prefix: str = "U",
                            item_prefix: str = "I", step_s: float = 60.0) -> list[Interaction]:
    rng = random.Random(seed)
    rows: list[Interaction] = []
    for user in range(n_users):
        cluster = user % n_clusters
        position = rng.randrange(cluster_size)
        clock = start + user * 7.0
        for step in range(per_user):
            position = (position + 1) % cluster_size if rng.random() < 0.85 else rng.randrange(cluster_size)
            clock += step_s
            rows.append(Interaction(event_id=f"{user_prefix}{user:04d}-{item_prefix}-{step:03d}-{seed}",
                                    user_id=f"{user_prefix}{user:04d}",
                                    item_id=structured_item_id(cluster, position, item_prefix),
                                    event_type="purchase" if step % 4 == 3 else "view", occurred_at=clock))
    return rows


def structured_catalog(n_clusters: int = 8, cluster_size: int = 8, prefix: str = "I") -> list[tuple[str, str, str]]:
    """(item_id, title, category) rows for `structured_interactions` items."""
    shades = ["Rose", "Amber", "Jade", "Onyx", "Pearl", "Coral", "Ivory", "Slate", "Sage", "Ruby"]
    products = ["Lip Balm", "Face Cream", "Serum", "Shampoo", "Mascara", "Cleanser", "Hair Oil", "Toner"]
    rows = []
    for cluster in range(n_clusters):
        for position in range(cluster_size):
            rows.append((structured_item_id(cluster, position, prefix),
                         f"{shades[cluster % len(shades)]} {products[position % len(products)]} no. {position}",
                         f"Cluster {cluster}"))
    return rows
