"""Content hashing and the embedding text of items (pure)."""
import numpy as np

from services.contracts.item_text import ItemText, clean, embedding_text, is_usable
from services.features.content import content_hash, pack_vector, unpack_vector


def test_hash_is_stable_hex_sha256():
    text = ItemText("Rose Lip Balm", "Soft lips", "Beauty > Lips", "Belle Rose")
    same = ItemText("Rose Lip Balm", "Soft lips", "Beauty > Lips", "Belle Rose")
    assert content_hash(text) == content_hash(same)
    assert len(content_hash(text)) == 64
    int(content_hash(text), 16)


def test_every_text_field_changes_the_hash():
    base = ItemText("t", "d", "c", "b")
    variants = [ItemText("T", "d", "c", "b"), ItemText("t", "D", "c", "b"),
                ItemText("t", "d", "C", "b"), ItemText("t", "d", "c", "B")]
    assert len({content_hash(base)} | {content_hash(v) for v in variants}) == 5


def test_moving_text_between_fields_changes_the_hash():
    assert content_hash(ItemText("ab", "c")) != content_hash(ItemText("a", "bc"))
    assert content_hash(ItemText("", "x")) != content_hash(ItemText("x", ""))


def test_price_is_not_part_of_the_text():
    row = {"item_id": "1", "title": "A", "description": "", "category": "c", "brand": "b", "price": "1.5"}
    changed = dict(row, price="99.0", currency="EUR", attributes={"size": "L"}, active=False)
    assert content_hash(ItemText.from_row(row)) == content_hash(ItemText.from_row(changed))


def test_embedding_text_puts_the_title_first_and_skips_empty_fields():
    assert embedding_text(ItemText("Rose Lip Balm", "A long description", "Lips", "Belle")) == \
        "Rose Lip Balm. Belle. Lips. A long description"
    assert embedding_text(ItemText("Only a title")) == "Only a title"
    assert embedding_text(ItemText("  spaced\tout\n title ", "", "", "")) == "spaced out title"


def test_clean_removes_control_characters():
    assert clean("a\x00b\x07c") == "a b c"


def test_usable_text_needs_a_letter_or_digit():
    assert is_usable("Lip balm")
    assert is_usable("42")
    assert is_usable("口紅")
    assert not is_usable("")
    assert not is_usable("   ")
    assert not is_usable("?!... --- ***")
    assert not is_usable("\u200b\u200b")


def test_vectors_pack_as_little_endian_float32():
    vector = np.array([1.0, -0.5, 0.25], dtype=np.float32)
    packed = pack_vector(vector)
    assert packed == np.array([1.0, -0.5, 0.25], dtype="<f4").tobytes()
    assert len(packed) == 12
    np.testing.assert_array_equal(unpack_vector(packed), vector)
