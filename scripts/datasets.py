"""Data sets for `make run`, benchmarks and tests: Amazon Beauty from ../shared/data, or a
small synthetic catalog and traffic when that folder is absent (so everything still runs)."""
from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = Path(os.environ.get("DELTAREC_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


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


def load_beauty(data_dir: Path | None = None, max_users: int | None = None) -> Dataset:
    folder = beauty_dir(data_dir)
    items = []
    with open(folder / "items.tsv", newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)  # header
        for row in reader:
            if len(row) >= 3:
                items.append(CatalogItem(row[0], row[2].strip(), category="Beauty"))
    sequences: dict[str, list[str]] = {}
    with open(folder / "sequences.txt", encoding="utf-8") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 2:
                sequences[parts[0]] = parts[1:]
            if max_users is not None and len(sequences) >= max_users:
                break
    return Dataset("amazon-beauty", items, sequences)


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
