"""A small interaction set with structure a tiny model learns in seconds, for tests and drills.

Items form clusters; each user stays in one cluster and mostly walks it in order (the next item
follows the previous one), so a model that learned anything ranks the true next item near the
top, the popularity baseline does not, and a model with negated scores ranks it near the bottom.
"""
from __future__ import annotations

import random

from services.trainer.interaction_log import Interaction

T0 = 1_700_000_000.0


def item_id(cluster: int, position: int, prefix: str = "I") -> str:
    return f"{prefix}{cluster:02d}-{position:02d}"


def structured_interactions(n_users: int = 60, n_clusters: int = 8, cluster_size: int = 8, per_user: int = 12,
                            seed: int = 7, start: float = T0, user_prefix: str = "U", item_prefix: str = "I",
                            step_s: float = 60.0) -> list[Interaction]:
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
                                    user_id=f"{user_prefix}{user:04d}", item_id=item_id(cluster, position, item_prefix),
                                    event_type="purchase" if step % 4 == 3 else "view", occurred_at=clock))
    return rows


def catalog(n_clusters: int = 8, cluster_size: int = 8, prefix: str = "I") -> list[tuple[str, str, str]]:
    """(item_id, title, category) rows for `structured_interactions` items."""
    shades = ["Rose", "Amber", "Jade", "Onyx", "Pearl", "Coral", "Ivory", "Slate", "Sage", "Ruby"]
    products = ["Lip Balm", "Face Cream", "Serum", "Shampoo", "Mascara", "Cleanser", "Hair Oil", "Toner"]
    rows = []
    for cluster in range(n_clusters):
        for position in range(cluster_size):
            rows.append((item_id(cluster, position, prefix),
                         f"{shades[cluster % len(shades)]} {products[position % len(products)]} no. {position}",
                         f"Cluster {cluster}"))
    return rows
