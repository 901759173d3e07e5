"""The bucketed digest scheme: how every side summarises a keyed set so that two sides can be
compared by moving kilobytes, not rows (anti-entropy as in Dynamo/Cassandra, one level deep).

Written down once here; Postgres computes the same values with the SQL functions created by
migration 0006 (`deltarec_bucket`, `deltarec_leaf`, `deltarec_content_hash`), and
tests/integration/test_consistency_digest_sql.py proves both implementations agree.

* **Bucket** of a key (item id, user id): the first 4 bytes of md5(key utf-8), big-endian,
  modulo NUM_BUCKETS. md5 is used for spreading, not for security; Postgres has it built in.
* **Leaf** of one row: the first 8 bytes of md5 of its compared fields joined by US (0x1f),
  as an unsigned 64-bit integer. The key is always the first field, so a row moved to another
  key changes two leaves.
* **Bucket digest**: (count of rows, XOR of their leaves). XOR is order-free (Postgres
  aggregates it with `bit_xor` in one pass, a ranker updates it in O(1) per change) and the
  keys of a set are unique, so no two equal leaves cancel. Two sides agree on a bucket when
  both count and XOR are equal; a drifted row changes its bucket's XOR with probability
  1 - 2^-64.
* **Root**: sha256 over the non-empty buckets in bucket order, a one-line summary of the set.

What the leaves hold, per comparison (the names below are the `kind`s used on the wire):

* ``catalog_items``: the active catalog, leaf(item_id, content_hash) where content_hash is the
  features service's hash of the item's embedding text (services/features/content.py);
  the feature store side is every active, listed item_features row that has an embedding.
* ``index_items``: what a ranker's index holds, leaf(item_id, vector_fingerprint) with the
  fingerprint md5 hex of the vector as packed little-endian float32 (the stored bytes);
  the feature store side is the same over active, listed item_features rows.
* ``user_events``: per user, leaf(user_id, views, clicks, add_to_carts, purchases, searches,
  history_length) — what the `events` table implies against what `user_features` holds.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

NUM_BUCKETS = 1024
FIELD_SEPARATOR = "\x1f"
LEAF_MASK = (1 << 64) - 1

CATALOG_ITEMS = "catalog_items"
INDEX_ITEMS = "index_items"
USER_EVENTS = "user_events"


def bucket_of(key: str, buckets: int = NUM_BUCKETS) -> int:
    return int.from_bytes(hashlib.md5(key.encode("utf-8")).digest()[:4], "big") % buckets


def leaf_text(fields: Iterable[object]) -> str:
    return FIELD_SEPARATOR.join(_field(value) for value in fields)


def _field(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"   # what Postgres' boolean::text gives
    return "" if value is None else str(value)


def leaf(*fields: object) -> int:
    """The leaf of one row; fields[0] is its key."""
    return int.from_bytes(hashlib.md5(leaf_text(fields).encode("utf-8")).digest()[:8], "big")


def vector_fingerprint(packed_le_f32: bytes) -> str:
    """Fingerprint of a vector in its stored form (little-endian float32 bytes)."""
    return hashlib.md5(packed_le_f32).hexdigest()


def unsigned(value: int) -> int:
    """A leaf or XOR as Postgres returns it (signed bigint) in the unsigned form used here."""
    return value & LEAF_MASK


@dataclass(frozen=True)
class BucketDigest:
    count: int = 0
    xor: int = 0

    def with_leaf(self, value: int) -> "BucketDigest":
        return BucketDigest(self.count + 1, self.xor ^ value)

    def without_leaf(self, value: int) -> "BucketDigest":
        return BucketDigest(self.count - 1, self.xor ^ value)


@dataclass
class Digest:
    """Bucket digests of one side of one comparison (empty buckets are absent)."""
    kind: str
    buckets: dict[int, BucketDigest] = field(default_factory=dict)
    num_buckets: int = NUM_BUCKETS

    @classmethod
    def of_rows(cls, kind: str, rows: Iterable[tuple], num_buckets: int = NUM_BUCKETS) -> "Digest":
        """From rows whose first field is the key and whose other fields are compared."""
        digest = cls(kind, num_buckets=num_buckets)
        for row in rows:
            digest.add(row[0], leaf(*row))
        return digest

    @classmethod
    def of_aggregates(cls, kind: str, rows: Iterable[tuple[int, int, int]],
                      num_buckets: int = NUM_BUCKETS) -> "Digest":
        """From (bucket, count, xor) rows as the SQL aggregate or a ranker returns them."""
        return cls(kind, {int(b): BucketDigest(int(n), unsigned(int(x))) for b, n, x in rows if int(n)},
                   num_buckets)

    def add(self, key: str, value: int) -> None:
        b = bucket_of(key, self.num_buckets)
        self.buckets[b] = self.buckets.get(b, BucketDigest()).with_leaf(value)

    def remove(self, key: str, value: int) -> None:
        b = bucket_of(key, self.num_buckets)
        updated = self.buckets.get(b, BucketDigest()).without_leaf(value)
        if updated.count == 0 and updated.xor == 0:
            self.buckets.pop(b, None)
        else:
            self.buckets[b] = updated

    @property
    def rows(self) -> int:
        return sum(d.count for d in self.buckets.values())

    def root(self) -> str:
        digest = hashlib.sha256(f"{self.kind}:{self.num_buckets}".encode())
        for b in sorted(self.buckets):
            d = self.buckets[b]
            digest.update(b.to_bytes(4, "big") + d.count.to_bytes(8, "big") + d.xor.to_bytes(8, "big"))
        return digest.hexdigest()

    def differing(self, other: "Digest") -> list[int]:
        """Buckets where the two sides disagree, in order."""
        if self.num_buckets != other.num_buckets:
            raise ValueError(f"bucket counts differ: {self.num_buckets} vs {other.num_buckets}")
        keys = set(self.buckets) | set(other.buckets)
        return sorted(b for b in keys if self.buckets.get(b) != other.buckets.get(b))

    def items(self) -> Iterator[tuple[int, BucketDigest]]:
        return iter(sorted(self.buckets.items()))


@dataclass(frozen=True)
class RowDiff:
    """Keys that differ inside the differing buckets: only on the left, only on the right, or
    on both with different values."""
    only_left: tuple[str, ...]
    only_right: tuple[str, ...]
    changed: tuple[str, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.only_left) | set(self.only_right) | set(self.changed)))

    def __bool__(self) -> bool:
        return bool(self.only_left or self.only_right or self.changed)


def diff_rows(left: Mapping[str, object], right: Mapping[str, object]) -> RowDiff:
    """Compares key -> compared-value maps read for the differing buckets only."""
    return RowDiff(tuple(sorted(set(left) - set(right))), tuple(sorted(set(right) - set(left))),
                   tuple(sorted(k for k in set(left) & set(right) if left[k] != right[k])))


# The SQL side of the scheme. Migration 0006 creates these functions (IMMUTABLE, so they can back
# expression indexes); the queries below are the only places that call them.
SQL_BUCKET = "deltarec_bucket({key}, {buckets})"
SQL_LEAF = "deltarec_leaf(concat_ws(E'\\x1f', {fields}))"


def sql_bucket(key_sql: str, buckets: int = NUM_BUCKETS) -> str:
    return SQL_BUCKET.format(key=key_sql, buckets=int(buckets))


def sql_leaf(*field_sqls: str) -> str:
    """Leaf of fields given as SQL text expressions (NULL counts as '')."""
    return SQL_LEAF.format(fields=", ".join(f"coalesce(({f})::text, '')" for f in field_sqls))
