"""The replica's side of the consistency check: a bucketed digest (services/contracts/digest.py,
kind "index_items") of what its item index holds — every active item with its text vector,
fingerprinted as the feature store stores it — taken atomically at the data watermark, and the
entries of given buckets so that a difference is localised by reading only those.

The digest is cached by the catalog's change sequence: a replica that changed nothing since the
last check answers at once.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from services.common.handler_pool import blocking
from services.contracts import digest as dg
from services.ranker.catalog import Catalog


@dataclass(frozen=True)
class IndexDigest:
    data_lsn: int
    digest: dg.Digest
    fingerprints: dict[str, str]        # item id -> vector fingerprint
    items: int


class IndexDigester:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._cache: tuple[int, IndexDigest] | None = None
        self._lock = threading.Lock()

    def take(self) -> IndexDigest:
        # The watermark is read before the snapshot: the snapshot may already hold changes of
        # the next batch (the catalog advances its watermark after applying), never fewer, so a
        # checker that treats changes above the stated watermark as lag stays right.
        watermark = self.catalog.watermark
        # Seconds of Python at a million items: the other calls must not queue behind it
        # (services/common/handler_pool.py).
        with blocking():
            _, item_ids, vectors, seq = self.catalog.snapshot()
            with self._lock:
                cached = self._cache
                if cached is not None and cached[0] == seq:
                    return IndexDigest(max(watermark, cached[1].data_lsn), cached[1].digest,
                                       cached[1].fingerprints, cached[1].items)
                fingerprints = {item_id: dg.vector_fingerprint(vectors[n].astype("<f4", copy=False).tobytes())
                                for n, item_id in enumerate(item_ids)}
                digest = dg.Digest.of_rows(dg.INDEX_ITEMS, fingerprints.items())
                result = IndexDigest(watermark, digest, fingerprints, len(fingerprints))
                self._cache = (seq, result)
                return result

    @staticmethod
    def entries(taken: IndexDigest, buckets: list[int]) -> list[tuple[str, str]]:
        wanted = set(buckets)
        return sorted((item_id, fingerprint) for item_id, fingerprint in taken.fingerprints.items()
                      if dg.bucket_of(item_id, taken.digest.num_buckets) in wanted)
