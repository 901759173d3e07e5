"""The bucketed digest scheme (services/contracts/digest.py), without any server."""
from __future__ import annotations

import random

from services.contracts import digest as dg


def rows(n: int, seed: int = 1) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"item-{i}", f"{rng.getrandbits(64):016x}") for i in range(n)]


def test_equal_sets_have_equal_roots_whatever_the_order():
    data = rows(2000)
    shuffled = list(data)
    random.Random(3).shuffle(shuffled)
    assert dg.Digest.of_rows("k", data).root() == dg.Digest.of_rows("k", shuffled).root()


def test_one_changed_row_changes_exactly_its_bucket():
    data = rows(5000)
    left = dg.Digest.of_rows("k", data)
    changed = list(data)
    changed[1234] = (changed[1234][0], "different")
    right = dg.Digest.of_rows("k", changed)
    assert left.differing(right) == [dg.bucket_of("item-1234")]
    assert left.root() != right.root()


def test_missing_and_extra_rows_are_found():
    data = rows(1000)
    left = dg.Digest.of_rows("k", data)
    right = dg.Digest.of_rows("k", data[1:] + [("new-item", "x")])
    assert set(left.differing(right)) == {dg.bucket_of("item-0"), dg.bucket_of("new-item")}


def test_add_and_remove_are_inverse():
    digest = dg.Digest.of_rows("k", rows(100))
    before = digest.root()
    value = dg.leaf("extra", "v")
    digest.add("extra", value)
    assert digest.root() != before
    digest.remove("extra", value)
    assert digest.root() == before


def test_aggregates_round_trip_signed_xor_from_postgres():
    digest = dg.Digest.of_rows("k", rows(300))
    signed = [(b, d.count, d.xor - (1 << 64) if d.xor >= 1 << 63 else d.xor) for b, d in digest.items()]
    assert dg.Digest.of_aggregates("k", signed).root() == digest.root()


def test_leaf_fields_are_typed_like_postgres_text():
    assert dg.leaf("a", True) == dg.leaf("a", "true")
    assert dg.leaf("a", None) == dg.leaf("a", "")
    assert dg.leaf("a", 5) == dg.leaf("a", "5")
    assert dg.leaf("ab", "c") != dg.leaf("a", "bc")


def test_buckets_spread_keys():
    counts = [0] * dg.NUM_BUCKETS
    for i in range(50_000):
        counts[dg.bucket_of(f"user-{i}")] += 1
    mean = 50_000 / dg.NUM_BUCKETS
    assert max(counts) < mean * 2 and min(counts) > mean / 3


def test_diff_rows_names_each_kind_of_difference():
    diff = dg.diff_rows({"a": 1, "b": 2, "c": 3}, {"b": 2, "c": 4, "d": 5})
    assert diff.only_left == ("a",) and diff.only_right == ("d",) and diff.changed == ("c",)
    assert diff.keys == ("a", "c", "d") and diff
    assert not dg.diff_rows({"a": 1}, {"a": 1})


def test_vector_fingerprint_is_of_the_stored_bytes():
    import numpy as np
    vector = np.arange(4, dtype="<f4")
    same = np.array([0, 1, 2, 3], "<f4")
    assert dg.vector_fingerprint(vector.tobytes()) == dg.vector_fingerprint(same.tobytes())
