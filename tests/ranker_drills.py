"""The ranker's failure drills, installed from outside the production code.

    python -m tests.ranker_drills        # a ranker replica, with the drill hooks of the env

runs `services.ranker.__main__.main` exactly as the service does, with one drill:

* `RANKER_DRILL_DROP_FEED_ITEM=<item id>`: the first live change of that item from the item feed
  is dropped while the feed's watermark moves on (the replica loses an upsert), after printing
  `DELTAREC_FAULT dropped feed item <id>` — what the consistency service must find and mend.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("deltarec.ranker.drills")


class DropFeedItem:
    """Drops the first live (catalog ready) upsert of `item_id`, once."""

    def __init__(self, item_id: str) -> None:
        self.item_id = item_id

    def __call__(self, updates: list, catalog_ready: bool) -> list:
        if not self.item_id or not catalog_ready:
            return updates
        kept = [u for u in updates if u.item_id != self.item_id or u.remove]
        if len(kept) != len(updates):
            log.warning("failure drill: dropping an item change", extra={"item_id": self.item_id})
            print(f"DELTAREC_FAULT dropped feed item {self.item_id}", flush=True)
            self.item_id = ""
        return kept


if __name__ == "__main__":
    from services.ranker.__main__ import main
    item = os.environ.get("RANKER_DRILL_DROP_FEED_ITEM", "")
    sys.exit(main(drop_feed_updates=DropFeedItem(item) if item else None))
