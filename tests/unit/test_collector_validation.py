"""Every validation rule of the collector, as pure functions (no database, no gRPC).

Reasons must name the field they are about: clients (and the rejected_events table) get them as is.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltarec.v1 import common_pb2

from services.collector import validation as v
from services.collector.validation import (Rejected, check_batch_size, event_payload,
                                           money_to_decimal, validate_event, validate_item)
from services.common.errors import InvalidArgument
from services.contracts.event_row import EventRow
from services.contracts.event_types import NAME_BY_PROTO, PROTO_BY_NAME

NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
SKEW_S = 300.0

NON_SEARCH_TYPES = [common_pb2.EVENT_TYPE_VIEW, common_pb2.EVENT_TYPE_CLICK,
                    common_pb2.EVENT_TYPE_ADD_TO_CART, common_pb2.EVENT_TYPE_PURCHASE]


def view(**fields) -> common_pb2.Event:
    base = dict(event_id="ev-1", type=common_pb2.EVENT_TYPE_VIEW, user_id="u-1", item_id="B000123")
    base.update(fields)
    return common_pb2.Event(**base)


def search(**fields) -> common_pb2.Event:
    base = dict(event_id="ev-s", type=common_pb2.EVENT_TYPE_SEARCH, user_id="u-1",
                query="vitamin c serum")
    base.update(fields)
    return common_pb2.Event(**base)


def at(event: common_pb2.Event, when: datetime) -> common_pb2.Event:
    event.timestamp.FromDatetime(when)
    return event


def reject_reason(event: common_pb2.Event, now: datetime = NOW, skew: float = SKEW_S) -> str:
    with pytest.raises(Rejected) as info:
        validate_event(event, now, skew)
    return str(info.value)


def item(**fields) -> common_pb2.Item:
    base = dict(item_id="B000123", title="Hydrating Rose Water Facial Toner, 8 fl oz",
                description="Alcohol-free toner with rose water and witch hazel.",
                category="Beauty > Skin Care > Toners", brand="Petal & Pine", active=True)
    base.update(fields)
    return common_pb2.Item(**base)


def item_reason(value: common_pb2.Item) -> str:
    with pytest.raises(Rejected) as info:
        validate_item(value)
    return str(info.value)


# ------------------------------------------------------------------------------ accepted shapes

def test_valid_view_becomes_a_row_with_the_same_fields():
    event = at(view(attributes={"page": "pdp", "position": "3"}), NOW - timedelta(minutes=5))
    row = validate_event(event, NOW, SKEW_S)
    assert row == EventRow("ev-1", "view", "u-1", "B000123", None, NOW - timedelta(minutes=5),
                           {"page": "pdp", "position": "3"})


@pytest.mark.parametrize("event_type,name", [
    (common_pb2.EVENT_TYPE_VIEW, "view"), (common_pb2.EVENT_TYPE_CLICK, "click"),
    (common_pb2.EVENT_TYPE_ADD_TO_CART, "add_to_cart"), (common_pb2.EVENT_TYPE_PURCHASE, "purchase")])
def test_every_item_event_type_maps_to_its_stored_name(event_type, name):
    assert validate_event(view(type=event_type), NOW, SKEW_S).event_type == name


def test_valid_search_has_a_query_and_no_item():
    row = validate_event(search(), NOW, SKEW_S)
    assert (row.event_type, row.item_id, row.query) == ("search", None, "vitamin c serum")


def test_unset_timestamp_means_the_collector_clock():
    assert validate_event(view(), NOW, SKEW_S).occurred_at == NOW


# ------------------------------------------------------------------------------ type and ids

@pytest.mark.parametrize("event_type", [common_pb2.EVENT_TYPE_UNSPECIFIED, 6, 99])
def test_unknown_event_type_is_rejected(event_type):
    assert reject_reason(view(type=event_type)).startswith("type: unknown event type")


@pytest.mark.parametrize("field", ["event_id", "user_id", "item_id"])
@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_missing_ids_are_rejected_naming_the_field(field, value):
    assert reject_reason(view(**{field: value})) == f"{field}: required"


@pytest.mark.parametrize("event_type", NON_SEARCH_TYPES)
def test_item_id_is_required_for_every_non_search_type(event_type):
    assert reject_reason(view(type=event_type, item_id="")).startswith("item_id:")


def test_item_on_a_search_is_rejected():
    assert reject_reason(search(item_id="B000123")) == "item_id: not allowed for EVENT_TYPE_SEARCH"


@pytest.mark.parametrize("event_type", NON_SEARCH_TYPES)
def test_query_on_a_non_search_is_rejected(event_type):
    reason = reject_reason(view(type=event_type, query="shampoo"))
    assert reason == f"query: only allowed for EVENT_TYPE_SEARCH, not {common_pb2.EventType.Name(event_type)}"


@pytest.mark.parametrize("query", ["", "  "])
def test_missing_query_on_a_search_is_rejected(query):
    assert reject_reason(search(query=query)) == "query: required"


# ------------------------------------------------------------------------------ timestamps

def test_timestamp_before_2000_is_rejected_and_2000_itself_accepted():
    just_before = datetime(1999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
    assert reject_reason(at(view(), just_before)).startswith("timestamp:")
    assert "before 2000-01-01" in reject_reason(at(view(), just_before))
    start = datetime(2000, 1, 1, tzinfo=timezone.utc)
    assert validate_event(at(view(), start), NOW, SKEW_S).occurred_at == start


def test_timestamp_too_far_in_the_future_is_rejected_against_the_injected_now():
    limit = NOW + timedelta(seconds=SKEW_S)
    assert validate_event(at(view(), limit), NOW, SKEW_S).occurred_at == limit
    reason = reject_reason(at(view(), limit + timedelta(seconds=1)))
    assert reason.startswith("timestamp:") and "in the future" in reason
    # The same instant is fine for a collector whose clock is later: `now` is what counts.
    later_now = NOW + timedelta(hours=1)
    assert validate_event(at(view(), limit + timedelta(seconds=1)), later_now, SKEW_S)


def test_zero_skew_allows_now_but_not_a_microsecond_later():
    assert validate_event(at(view(), NOW), NOW, 0.0).occurred_at == NOW
    # Below a second the reason would print "0s in the future": the rule still applies.
    with pytest.raises(Rejected):
        validate_event(at(view(), NOW + timedelta(seconds=1)), NOW, 0.0)


@pytest.mark.parametrize("seconds,nanos", [(10 ** 12, 0), (-10 ** 12, 0), (1_700_000_000, -5)])
def test_timestamp_out_of_protobuf_range_is_rejected(seconds, nanos):
    event = view()
    event.timestamp.seconds, event.timestamp.nanos = seconds, nanos
    assert reject_reason(event) == "timestamp: out of range"


# ------------------------------------------------------------------------------ sizes and NULs

@pytest.mark.parametrize("field", ["event_id", "user_id", "item_id"])
def test_ids_are_limited_to_128_bytes(field):
    assert validate_event(view(**{field: "x" * 128}), NOW, SKEW_S)
    assert reject_reason(view(**{field: "x" * 129})) == f"{field}: 129 bytes, more than 128"


def test_id_limit_counts_utf8_bytes_not_characters():
    # 65 characters, 130 bytes.
    assert reject_reason(view(user_id="é" * 65)) == "user_id: 130 bytes, more than 128"
    assert validate_event(view(user_id="é" * 64), NOW, SKEW_S).user_id == "é" * 64


def test_query_is_limited_to_1024_bytes():
    assert validate_event(search(query="q" * 1024), NOW, SKEW_S).query == "q" * 1024
    assert reject_reason(search(query="q" * 1025)) == "query: 1025 bytes, more than 1024"
    assert reject_reason(search(query="€" * 342)) == "query: 1026 bytes, more than 1024"


def test_event_attributes_count_key_and_value_sizes():
    at_limit = {f"k{i}": "v" for i in range(v.MAX_ATTRIBUTES)}
    assert validate_event(view(attributes=at_limit), NOW, SKEW_S).attributes == at_limit
    too_many = {f"k{i}": "v" for i in range(v.MAX_ATTRIBUTES + 1)}
    assert reject_reason(view(attributes=too_many)) == "attributes: 33 entries, more than 32"
    assert reject_reason(view(attributes={"k" * 65: "v"})) == "attributes key: 65 bytes, more than 64"
    assert reject_reason(view(attributes={"note": "v" * 1025})) == \
        "attributes[note]: 1025 bytes, more than 1024"
    assert reject_reason(view(attributes={"": "v"})) == "attributes key: required"
    # Empty values are allowed.
    assert validate_event(view(attributes={"coupon": ""}), NOW, SKEW_S).attributes == {"coupon": ""}


@pytest.mark.parametrize("event,field", [
    (view(event_id="ev\x001"), "event_id"), (view(user_id="u\x00"), "user_id"),
    (view(item_id="\x00B0"), "item_id"), (search(query="lip\x00balm"), "query"),
    (view(attributes={"k\x00": "v"}), "attributes key"), (view(attributes={"k": "v\x00"}), "attributes[k]")])
def test_nul_characters_are_rejected(event, field):
    # Postgres text cannot hold NUL: letting one through would fail the whole batch.
    assert reject_reason(event) == f"{field}: contains a NUL character"


def test_first_failing_rule_wins_and_event_id_is_checked_first():
    assert reject_reason(view(event_id="", user_id="", type=99)) == "event_id: required"


# ------------------------------------------------------------------------------ items

def test_valid_item_becomes_a_row():
    value = item(price=common_pb2.Money(currency_code="EUR", units=19, nanos=990_000_000),
                 attributes={"size": "250 ml"})
    row = validate_item(value)
    assert row == v.ItemRow("B000123", value.title, value.description, value.category, value.brand,
                            Decimal("19.99"), "EUR", {"size": "250 ml"}, True)


def test_item_without_title_is_valid():
    # Real catalogs have items without a title; features embeds them with a fallback vector.
    assert validate_item(item(title="")).title == ""


def test_item_without_price_has_no_price_or_currency():
    row = validate_item(item())
    assert (row.price, row.currency) == (None, None)


@pytest.mark.parametrize("fields,reason", [
    ({"item_id": ""}, "item_id: required"),
    ({"item_id": "i" * 129}, "item_id: 129 bytes, more than 128"),
    ({"title": "t" * 1025}, "title: 1025 bytes, more than 1024"),
    ({"description": "d" * 16385}, "description: 16385 bytes, more than 16384"),
    ({"category": "c" * 257}, "category: 257 bytes, more than 256"),
    ({"brand": "b" * 257}, "brand: 257 bytes, more than 256"),
    ({"title": "Rose\x00Water"}, "title: contains a NUL character"),
    ({"description": "\x00"}, "description: contains a NUL character"),
    ({"attributes": {f"k{i}": "v" for i in range(65)}}, "attributes: 65 entries, more than 64"),
    ({"attributes": {"k" * 65: "v"}}, "attributes key: 65 bytes, more than 64"),
    ({"attributes": {"ingredients": "x" * 1025}}, "attributes[ingredients]: 1025 bytes, more than 1024"),
])
def test_item_rules(fields, reason):
    assert item_reason(item(**fields)) == reason


def test_item_limits_are_inclusive():
    row = validate_item(item(item_id="i" * 128, title="t" * 1024, description="d" * 16384,
                             category="c" * 256, brand="b" * 256,
                             attributes={f"k{i}": "v" for i in range(64)}))
    assert len(row.attributes) == 64 and row.description == "d" * 16384


# ------------------------------------------------------------------------------ money

@pytest.mark.parametrize("units,nanos,expected", [
    (0, 0, Decimal("0")), (19, 990_000_000, Decimal("19.99")), (0, 1, Decimal("0.000000001")),
    (999_999_999, 999_999_999, Decimal("999999999.999999999")),
    (12_345_678, 123_456_789, Decimal("12345678.123456789"))])
def test_money_converts_exactly(units, nanos, expected):
    amount, currency = money_to_decimal(common_pb2.Money(currency_code="USD", units=units, nanos=nanos))
    assert amount == expected and currency == "USD"


@pytest.mark.parametrize("code", ["", "eur", "EURO", "EU", "E1R", "€UR", " EUR"])
def test_currency_must_be_three_upper_case_letters(code):
    with pytest.raises(Rejected, match=r"^price\.currency_code: "):
        money_to_decimal(common_pb2.Money(currency_code=code, units=1))


@pytest.mark.parametrize("nanos", [1_000_000_000, -1_000_000_000, 2 ** 31 - 1])
def test_nanos_out_of_range(nanos):
    with pytest.raises(Rejected, match=r"^price\.nanos: "):
        money_to_decimal(common_pb2.Money(currency_code="EUR", units=0, nanos=nanos))


@pytest.mark.parametrize("units,nanos", [(1, -1), (-1, 1)])
def test_units_and_nanos_must_share_their_sign(units, nanos):
    with pytest.raises(Rejected, match="same sign"):
        money_to_decimal(common_pb2.Money(currency_code="EUR", units=units, nanos=nanos))


@pytest.mark.parametrize("units,nanos", [(-1, 0), (0, -1), (-5, -500_000_000)])
def test_negative_prices_are_rejected(units, nanos):
    with pytest.raises(Rejected, match="must not be negative"):
        money_to_decimal(common_pb2.Money(currency_code="EUR", units=units, nanos=nanos))


def test_price_too_large_for_the_column_is_rejected():
    # items.price is numeric(18, 9): at most 9 integer digits.
    with pytest.raises(Rejected, match="too large"):
        money_to_decimal(common_pb2.Money(currency_code="EUR", units=1_000_000_000))


def test_item_price_errors_are_item_rejections():
    assert item_reason(item(price=common_pb2.Money(currency_code="usd", units=3))).startswith(
        "price.currency_code:")
    assert item_reason(item(price=common_pb2.Money(currency_code="USD", units=-3))) == \
        "price: must not be negative"


# ------------------------------------------------------------------------------ request shape

@pytest.mark.parametrize("field", ["events", "items", "item_ids"])
def test_batch_size_limit_raises_invalid_argument_naming_the_field(field):
    check_batch_size(1000, 1000, field)
    with pytest.raises(InvalidArgument) as info:
        check_batch_size(1001, 1000, field)
    assert str(info.value).startswith(f"{field}: ") and "1000" in str(info.value)
    with pytest.raises(InvalidArgument) as info:
        check_batch_size(0, 1000, field)
    assert str(info.value) == f"{field}: must not be empty"


# ------------------------------------------------------------------------------ rejected payloads

def test_rejected_payload_keeps_the_fields_as_json():
    event = at(view(user_id="", attributes={"page": "pdp"}), datetime(2024, 1, 2, tzinfo=timezone.utc))
    payload = json.loads(event_payload(event))
    assert payload == {"event_id": "ev-1", "type": "EVENT_TYPE_VIEW", "item_id": "B000123",
                       "timestamp": "2024-01-02T00:00:00Z", "attributes": {"page": "pdp"}}


@pytest.mark.parametrize("event", [
    view(event_id="a\x00b"), view(attributes={"k\x00": "v\x00"}),
    view(timestamp={"seconds": 10 ** 12}), view(timestamp={"seconds": 1, "nanos": -1}), view(type=99)])
def test_rejected_payload_of_any_event_is_storable_jsonb(event):
    # jsonb refuses \u0000 and the payload of an event with an invalid timestamp must still be
    # writable: a rejected event may never fail the rest of its batch.
    with pytest.raises(Rejected):
        validate_event(event, NOW, SKEW_S)
    text = event_payload(event)
    assert "\\u0000" not in text
    assert isinstance(json.loads(text), dict)


# ------------------------------------------------------------------------------ properties

def _text(max_bytes: int, min_size: int = 1):
    alphabet = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
    return (st.text(alphabet, min_size=min_size, max_size=max_bytes)
            .filter(lambda s: len(s.encode()) <= max_bytes and (min_size == 0 or s.strip())))


def _id():
    """Ids: any printable text (control characters are refused in ids, kept in free text)."""
    alphabet = st.characters(blacklist_categories=("Cs", "Cc"))
    return st.text(alphabet, min_size=1, max_size=128).filter(lambda s: len(s.encode()) <= 128 and s.strip())


_times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2024, 6, 1, 12, 5),
                      timezones=st.just(timezone.utc))
_attributes = st.dictionaries(_text(64), _text(1024, min_size=0), max_size=v.MAX_ATTRIBUTES)


@st.composite
def valid_events(draw):
    event_type = draw(st.sampled_from(sorted(NAME_BY_PROTO)))
    event = common_pb2.Event(event_id=draw(_id()), type=event_type, user_id=draw(_id()),
                              attributes=draw(_attributes))
    if event_type == common_pb2.EVENT_TYPE_SEARCH:
        event.query = draw(_text(1024))
    else:
        event.item_id = draw(_id())
    when = draw(st.none() | _times)
    if when is not None:
        event.timestamp.FromDatetime(when)
    return event, when


@settings(max_examples=300, deadline=None)
@given(valid_events())
def test_any_valid_event_round_trips_to_a_row_with_the_same_fields(case):
    event, when = case
    row = validate_event(event, NOW, SKEW_S)
    assert row.event_id == event.event_id and row.user_id == event.user_id
    assert row.event_type == NAME_BY_PROTO[event.type]
    assert row.item_id == (event.item_id or None) and row.query == (event.query or None)
    assert row.occurred_at == (NOW if when is None else when)
    assert row.attributes == dict(event.attributes)
    assert PROTO_BY_NAME[row.event_type] == event.type


@settings(max_examples=200, deadline=None)
@given(valid_events(), st.sampled_from(["event_id", "user_id"]), st.integers(129, 600))
def test_any_oversized_id_is_rejected_naming_it(case, field, size):
    event, _ = case
    setattr(event, field, "é" * (size // 2) + "x" * (size % 2))
    assert reject_reason(event) == f"{field}: {size} bytes, more than 128"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 999_999_999), st.integers(0, 999_999_999))
def test_any_valid_price_converts_exactly(units, nanos):
    amount, _ = money_to_decimal(common_pb2.Money(currency_code="JPY", units=units, nanos=nanos))
    assert amount * 10 ** 9 == units * 10 ** 9 + nanos
