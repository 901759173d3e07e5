"""A ranker's index digest (services/ranker/index_digest.py) against the feature store's side of
the same scheme, without servers."""
from __future__ import annotations

import numpy as np

from services.contracts import digest as dg
from services.ranker.catalog import Catalog, ItemUpdate
from services.ranker.index_digest import IndexDigester


def vector(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return v / np.linalg.norm(v)


def catalog_with(n: int) -> Catalog:
    catalog = Catalog()
    catalog.apply([ItemUpdate(f"item-{i}", lsn=10, title=f"t{i}", vector=vector(i)) for i in range(n)], 10)
    return catalog


def expected(ids) -> dg.Digest:
    """What the feature store computes: md5 of the stored little-endian float32 bytes."""
    return dg.Digest.of_rows(dg.INDEX_ITEMS, [
        (f"item-{i}", dg.vector_fingerprint(vector(i).astype("<f4").tobytes())) for i in ids])


def test_digest_matches_the_feature_stores_at_the_watermark():
    taken = IndexDigester(catalog_with(50)).take()
    assert taken.data_lsn == 10 and taken.items == 50
    assert taken.digest.root() == expected(range(50)).root()


def test_a_removed_or_changed_item_shows_in_its_bucket_only():
    catalog = catalog_with(50)
    digester = IndexDigester(catalog)
    catalog.apply([ItemUpdate("item-3", lsn=11, remove=True),
                   ItemUpdate("item-4", lsn=11, title="t4", vector=vector(1000))], 11)
    taken = digester.take()
    differing = expected(range(50)).differing(taken.digest)
    assert set(differing) == {dg.bucket_of("item-3"), dg.bucket_of("item-4")}
    entries = dict(digester.entries(taken, differing))
    assert "item-3" not in entries and entries["item-4"] == dg.vector_fingerprint(vector(1000).tobytes())


def test_the_digest_is_cached_until_the_catalog_changes():
    catalog = catalog_with(20)
    digester = IndexDigester(catalog)
    first = digester.take()
    assert digester.take().digest is first.digest
    catalog.apply([ItemUpdate("item-new", lsn=12, title="n", vector=vector(77))], 12)
    assert digester.take().digest.rows == 21
