"""Validation of events and items: pure functions, no I/O.

Each rule yields a reason that names the field, e.g.
`item_id: required for EVENT_TYPE_VIEW`. A bad event is rejected alone; only a
malformed request as a whole (see `check_batch_size`) fails the call.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal

from deltarec.v1 import common_pb2

from services.common.errors import InvalidArgument
from services.common.validation import MAX_ID_BYTES, quote, text_problem
from services.contracts.event_row import EventRow
from services.contracts.event_types import BY_PROTO
from services.feedback.recommendation_id import EVENT_ATTRIBUTE, InvalidRecommendationId
from services.feedback.recommendation_id import parse as parse_recommendation_id

MAX_QUERY_BYTES = 1024
MAX_TITLE_BYTES = 1024
MAX_DESCRIPTION_BYTES = 16384
MAX_SHORT_TEXT_BYTES = 256
MAX_ATTRIBUTES = 32
MAX_ITEM_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY_BYTES = 64
MAX_ATTRIBUTE_VALUE_BYTES = 1024
EARLIEST_EVENT = datetime(2000, 1, 1, tzinfo=timezone.utc)
CURRENCY = re.compile(r"[A-Z]{3}")



class Rejected(Exception):
    """One event or item is invalid; the message is the reason given to the client."""


@dataclass(frozen=True)
class ItemRow:
    item_id: str
    title: str
    description: str
    category: str
    brand: str
    price: Decimal | None
    currency: str | None
    attributes: dict[str, str]
    active: bool


def check_batch_size(count: int, limit: int, field_name: str) -> None:
    if count == 0:
        raise InvalidArgument(f"{field_name}: must not be empty")
    if count > limit:
        raise InvalidArgument(f"{field_name}: {count} entries, more than the limit of {limit}")


def _text(name: str, value: str, limit: int, *, required: bool, identifier: bool = False) -> None:
    problem = text_problem(value, limit, required=required, identifier=identifier)
    if problem:
        raise Rejected(f"{name}: {problem}")


def _id(name: str, value: str) -> None:
    _text(name, value, MAX_ID_BYTES, required=True, identifier=True)


def _attributes(attributes, limit: int) -> dict[str, str]:
    attributes = dict(attributes)   # iterating a plain dict is much cheaper than a protobuf map
    if len(attributes) > limit:
        raise Rejected(f"attributes: {len(attributes)} entries, more than {limit}")
    for key, value in attributes.items():
        _text("attributes key", key, MAX_ATTRIBUTE_KEY_BYTES, required=True)
        _text(f"attributes[{key}]", value, MAX_ATTRIBUTE_VALUE_BYTES, required=False)
    return attributes


def validate_event(event: common_pb2.Event, now: datetime, max_clock_skew_s: float) -> EventRow:
    _id("event_id", event.event_id)
    kind = BY_PROTO.get(event.type)
    if kind is None:
        raise Rejected(f"type: unknown event type {event.type}")
    type_name = kind.name
    _id("user_id", event.user_id)
    if not kind.has_item:
        if event.item_id:
            raise Rejected(f"item_id: not allowed for {kind.proto_name}")
        _text("query", event.query, MAX_QUERY_BYTES, required=True)
    else:
        _id("item_id", event.item_id)
        if event.query:
            raise Rejected(f"query: only allowed for EVENT_TYPE_SEARCH, not {kind.proto_name}")
    if event.HasField("timestamp"):
        try:
            occurred_at = event.timestamp.ToDatetime(tzinfo=timezone.utc)
        except (ValueError, OverflowError):
            raise Rejected("timestamp: out of range") from None
        if occurred_at < EARLIEST_EVENT:
            raise Rejected(f"timestamp: {occurred_at.isoformat()} is before 2000-01-01")
        skew = (occurred_at - now).total_seconds()
        if skew > max_clock_skew_s:
            raise Rejected(f"timestamp: {skew:.0f}s in the future (at most {max_clock_skew_s:.0f}s allowed)")
    else:
        occurred_at = now
    attributes = _attributes(event.attributes, MAX_ATTRIBUTES)
    if EVENT_ATTRIBUTE in attributes:
        raise Rejected(f"attributes[{EVENT_ATTRIBUTE}]: reserved; send it as recommendation_id")
    if event.recommendation_id:
        try:
            parse_recommendation_id(event.recommendation_id)
        except InvalidRecommendationId as error:
            raise Rejected(str(error)) from None
        attributes[EVENT_ATTRIBUTE] = event.recommendation_id
    return EventRow(event.event_id, type_name, event.user_id, event.item_id or None,
                    event.query or None, occurred_at, attributes)


def money_to_decimal(money: common_pb2.Money) -> tuple[Decimal, str]:
    if not CURRENCY.fullmatch(money.currency_code):
        raise Rejected(f"price.currency_code: {quote(money.currency_code)} is not an ISO 4217 code")
    if not -999_999_999 <= money.nanos <= 999_999_999:
        raise Rejected("price.nanos: must be within +-999,999,999")
    if (money.units > 0 and money.nanos < 0) or (money.units < 0 and money.nanos > 0):
        raise Rejected("price: units and nanos must have the same sign")
    amount = Decimal(money.units) + Decimal(money.nanos) / Decimal(1_000_000_000)
    if amount < 0:
        raise Rejected("price: must not be negative")
    if amount >= Decimal(10) ** 9:
        raise Rejected("price: too large")
    return amount, money.currency_code


def validate_item(item: common_pb2.Item) -> ItemRow:
    _id("item_id", item.item_id)
    # A title is not required: real catalogs have items without one (7 of Amazon Beauty's 12,101),
    # and they still sell. Features gives them a deterministic fallback vector.
    _text("title", item.title, MAX_TITLE_BYTES, required=False)
    _text("description", item.description, MAX_DESCRIPTION_BYTES, required=False)
    _text("category", item.category, MAX_SHORT_TEXT_BYTES, required=False)
    _text("brand", item.brand, MAX_SHORT_TEXT_BYTES, required=False)
    price, currency = money_to_decimal(item.price) if item.HasField("price") else (None, None)
    attributes = _attributes(item.attributes, MAX_ITEM_ATTRIBUTES)
    return ItemRow(item.item_id, item.title, item.description, item.category, item.brand,
                   price, currency, attributes, item.active)


def event_payload(event: common_pb2.Event) -> str:
    """What we keep of a rejected event: its fields as JSON, whatever they were."""
    from google.protobuf import json_format
    try:
        payload = json_format.MessageToDict(event, preserving_proto_field_name=True)
    except json_format.Error:  # a timestamp out of range cannot be rendered: keep its raw fields
        copy = common_pb2.Event()
        copy.CopyFrom(event)
        copy.ClearField("timestamp")
        payload = json_format.MessageToDict(copy, preserving_proto_field_name=True)
        payload["timestamp"] = {"seconds": event.timestamp.seconds, "nanos": event.timestamp.nanos}
    return json.dumps(_without_nul(payload))


def _without_nul(value):
    """jsonb refuses U+0000 (and so would fail the whole batch): store U+FFFD instead."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    return value
