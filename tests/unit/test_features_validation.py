"""Request limits of the features API (pure)."""
import pytest

from services.common.errors import InvalidArgument
from services.features import validation


def test_ids_are_required_bounded_and_deduplicated():
    assert validation.check_ids("item_ids", ["a", "b", "a"], 10) == ["a", "b"]
    with pytest.raises(InvalidArgument, match="item_ids: must not be empty"):
        validation.check_ids("item_ids", [], 10)
    with pytest.raises(InvalidArgument, match=r"item_ids: 3 entries, more than the limit of 2"):
        validation.check_ids("item_ids", ["a", "b", "c"], 2)
    with pytest.raises(InvalidArgument, match=r"item_ids\[1\]: required"):
        validation.check_ids("item_ids", ["a", ""], 10)
    with pytest.raises(InvalidArgument, match=r"item_ids\[0\]: 129 bytes"):
        validation.check_ids("item_ids", ["x" * 129], 10)


def test_user_id():
    assert validation.check_id("user_id", "u1") == "u1"
    with pytest.raises(InvalidArgument, match="user_id: required"):
        validation.check_id("user_id", "")


def test_texts():
    assert validation.check_texts(["a", "b"]) == ["a", "b"]
    with pytest.raises(InvalidArgument, match="texts: must not be empty"):
        validation.check_texts([])
    with pytest.raises(InvalidArgument, match="texts: 257 entries"):
        validation.check_texts(["a"] * 257)
    with pytest.raises(InvalidArgument, match=r"texts\[1\]: 2049 bytes"):
        validation.check_texts(["a", "x" * 2049])
    with pytest.raises(InvalidArgument, match=r"texts\[0\]: required"):
        validation.check_texts(["  "])


def test_watch_batch_size():
    assert validation.watch_batch_size(0) == validation.DEFAULT_WATCH_BATCH
    assert validation.watch_batch_size(10) == 10
    with pytest.raises(InvalidArgument, match="max_batch_size"):
        validation.watch_batch_size(validation.MAX_WATCH_BATCH + 1)
