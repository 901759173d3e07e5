"""The shared field checks (services/common/validation.py) and the bounded status messages."""
from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common import validation as v
from services.common.errors import InvalidArgument, bounded, status_for


@pytest.mark.parametrize("value,reason", [
    ("", "required"), ("  ", "required"), ("a\x00b", "contains a NUL character"),
    ("a\x01", "contains a control character (U+0001)"), ("tab\there", "contains a control character (U+0009)"),
    ("\x7f", "contains a control character (U+007F)"), ("a\x85", "contains a control character (U+0085)"),
    ("é" * 65, "130 bytes, more than 128")])
def test_ids_refuse_empty_control_characters_and_oversize_naming_the_field(value, reason):
    with pytest.raises(InvalidArgument) as info:
        v.check_id("user_id", value)
    assert str(info.value) == f"user_id: {reason}"


def test_optional_id_may_be_empty_and_printable_unicode_is_an_id():
    assert v.check_id("user_id", "", required=False) == ""
    assert v.check_id("item_id", "B00-ß✓ 日本") == "B00-ß✓ 日本"


def test_free_text_keeps_tabs_and_newlines_but_refuses_nul():
    assert v.check_text("title", "line 1\nline\t2", 100) == "line 1\nline\t2"
    with pytest.raises(InvalidArgument, match=r"^title: contains a NUL character$"):
        v.check_text("title", "a\x00", 100)
    with pytest.raises(InvalidArgument, match=r"^query: required$"):
        v.check_text("query", " ", 100, required=True)


def test_lists_are_bounded_and_each_entry_named_by_position():
    assert v.check_ids("item_ids", ["a", "b", "a"], 10) == ["a", "b"]
    with pytest.raises(InvalidArgument, match=r"^item_ids: must not be empty$"):
        v.check_ids("item_ids", [], 10)
    with pytest.raises(InvalidArgument, match=r"^item_ids: 11 entries, more than the limit of 10$"):
        v.check_ids("item_ids", ["a"] * 11, 10)
    with pytest.raises(InvalidArgument, match=r"^item_ids\[1\]: contains a NUL character$"):
        v.check_ids("item_ids", ["a", "\x00"], 10)


def test_numbers_have_closed_ranges_and_zero_may_mean_the_default():
    assert v.check_int("epochs", 0, 1, 200, default=16) == 16
    assert v.check_int("seed", 2 ** 32 - 1, 0, 2 ** 32 - 1) == 2 ** 32 - 1
    with pytest.raises(InvalidArgument, match=r"^seed: 18446744073709551615 is outside 0\.\.4294967295$"):
        v.check_int("seed", 2 ** 64 - 1, 0, 2 ** 32 - 1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InvalidArgument, match="must be a finite number"):
            v.check_number("share", bad, 0, 1)
    with pytest.raises(InvalidArgument, match=r"^share: 2 is outside 0\.\.1$"):
        v.check_number("share", 2.0, 0, 1)


def test_a_huge_value_is_never_quoted_in_full():
    huge = "x" * 1_000_000
    with pytest.raises(InvalidArgument) as info:
        v.check_choice("strategy.priority", huge, ["recency"])
    assert len(str(info.value)) < 200
    with pytest.raises(InvalidArgument) as info:
        v.check_id("item_ids[0]", huge)
    assert str(info.value) == "item_ids[0]: 1000000 bytes, more than 128"


def test_status_messages_are_bounded_whatever_raised():
    message = bounded("y" * 2_000_000)
    assert len(message) <= 1024 and message.endswith("(truncated)")
    code, text = status_for(InvalidArgument("z" * 50_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT   # the cut happens where the call is aborted


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_string_either_passes_or_is_refused_with_a_reason_naming_the_field(value):
    try:
        assert v.check_id("user_id", value) == value
    except InvalidArgument as error:
        assert str(error).startswith("user_id: ") and len(str(error)) < 100
