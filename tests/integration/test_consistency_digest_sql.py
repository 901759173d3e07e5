"""The SQL side of the digest scheme (migration 0006) agrees with services/contracts/digest.py,
and deltarec_content_hash with the features service's content hash, on awkward inputs."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from services.contracts import digest
from services.contracts.item_text import ItemText
from services.features.content import content_hash

pytestmark = pytest.mark.integration

KEYS = ["item-1", "", "ünïcødé ✓", "a" * 300, "x\x1fy", "user-42"]
TEXTS = [ItemText("Rose Lip Balm", "", "Beauty > Lips", "Belle Rose"), ItemText(),
         ItemText("ab", "c", "", ""), ItemText("a", "bc", "", ""),
         ItemText("日本語のタイトル", "long " * 500, "カテゴリ", "ブランド")]


def test_bucket_and_leaf_match_python(engine):
    with engine.connect() as connection:
        for key in KEYS:
            bucket, leaf = connection.execute(sa.text(
                f"SELECT {digest.sql_bucket(':k')}, {digest.sql_leaf(':k', ':n', ':b')}"),
                {"k": key, "n": 7, "b": True}).one()
            assert bucket == digest.bucket_of(key)
            assert digest.unsigned(leaf) == digest.leaf(key, 7, True)


def test_null_fields_count_as_empty(engine):
    with engine.connect() as connection:
        value = connection.execute(sa.text(f"SELECT {digest.sql_leaf(':k', 'NULL')}"), {"k": "i"}).scalar()
    assert digest.unsigned(value) == digest.leaf("i", None) == digest.leaf("i", "")


def test_content_hash_matches_features(engine):
    with engine.connect() as connection:
        for text in TEXTS:
            value = connection.execute(sa.text("SELECT deltarec_content_hash(:t, :d, :c, :b)"),
                                       {"t": text.title, "d": text.description, "c": text.category,
                                        "b": text.brand}).scalar()
            assert value == content_hash(text)


def test_items_keep_the_content_hash_of_their_text(engine):
    with engine.begin() as connection:
        for n, text in enumerate(TEXTS):
            connection.execute(sa.text("INSERT INTO items (item_id, title, description, category, brand) "
                                       "VALUES (:i, :t, :d, :c, :b)"),
                               {"i": f"hash-{n}", "t": text.title, "d": text.description, "c": text.category,
                                "b": text.brand})
        connection.execute(sa.text("UPDATE items SET title = 'changed' WHERE item_id = 'hash-0'"))
        stored = dict(connection.execute(sa.text(
            "SELECT item_id, content_hash FROM items WHERE item_id LIKE 'hash-%'")).all())
    assert stored["hash-0"] == content_hash(ItemText("changed", *[getattr(TEXTS[0], f) for f in
                                                                  ("description", "category", "brand")]))
    for n, text in enumerate(TEXTS[1:], start=1):
        assert stored[f"hash-{n}"] == content_hash(text)


def test_aggregate_matches_python(engine):
    rows = [(f"k{n}", f"v{n % 7}") for n in range(3000)]
    expected = digest.Digest.of_rows("t", rows)
    with engine.connect() as connection:
        got = connection.execute(sa.text(
            f"SELECT {digest.sql_bucket('k')}, count(*), bit_xor({digest.sql_leaf('k', 'v')}) "
            "FROM unnest(CAST(:ks AS text[]), CAST(:vs AS text[])) AS t(k, v) GROUP BY 1"),
            {"ks": [r[0] for r in rows], "vs": [r[1] for r in rows]}).all()
    assert digest.Digest.of_aggregates("t", got).root() == expected.root()
