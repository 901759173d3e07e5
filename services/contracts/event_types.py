"""The event-type vocabulary shared by every service: proto enum number <-> name <-> model index.

One table, `EVENT_KINDS`, says for every kind of behaviour event:

* `proto`: its number in `deltarec.v1.EventType` (what clients send and features returns);
* `name`: the word stored in `events.event_type` (and carried by the delta stream, kept in
  `user_features` histories and `trainer_interactions`);
* `model_index`: its row of the model's event-type embedding (:class:`EventType`; 0 = padding);
* `has_item`: whether the event names an item (every kind but SEARCH, which carries a query).

Everything else (the collector's validation, features' counters and history, the trainer's
interaction log, the ranker's user tower) looks kinds up here instead of keeping its own list.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from deltarec.v1 import common_pb2


class EventType(enum.IntEnum):
    """Interaction kinds; the value is the index into the event-type embedding."""

    PAD = 0
    VIEW = 1
    CLICK = 2
    ADD_TO_CART = 3
    PURCHASE = 4
    SEARCH = 5

    @classmethod
    def parse(cls, name: str | int | "EventType") -> "EventType":
        if isinstance(name, (int, EventType)):
            return cls(int(name))
        return cls[name.strip().upper()]


NUM_EVENT_TYPES = len(EventType)


@dataclass(frozen=True)
class EventKind:
    proto: int
    name: str
    model_index: EventType
    has_item: bool

    @property
    def proto_name(self) -> str:
        """`EVENT_TYPE_VIEW`: the enum value's name, as reasons and grpcurl spell it."""
        return common_pb2.EventType.Name(self.proto)


EVENT_KINDS: tuple[EventKind, ...] = (
    EventKind(common_pb2.EVENT_TYPE_VIEW, "view", EventType.VIEW, has_item=True),
    EventKind(common_pb2.EVENT_TYPE_CLICK, "click", EventType.CLICK, has_item=True),
    EventKind(common_pb2.EVENT_TYPE_ADD_TO_CART, "add_to_cart", EventType.ADD_TO_CART, has_item=True),
    EventKind(common_pb2.EVENT_TYPE_PURCHASE, "purchase", EventType.PURCHASE, has_item=True),
    EventKind(common_pb2.EVENT_TYPE_SEARCH, "search", EventType.SEARCH, has_item=False),
)

BY_PROTO: dict[int, EventKind] = {kind.proto: kind for kind in EVENT_KINDS}
BY_NAME: dict[str, EventKind] = {kind.name: kind for kind in EVENT_KINDS}

NAME_BY_PROTO: dict[int, str] = {kind.proto: kind.name for kind in EVENT_KINDS}
"""Proto enum number -> `events.event_type` (UNSPECIFIED and unknown numbers are absent)."""
PROTO_BY_NAME: dict[str, int] = {kind.name: kind.proto for kind in EVENT_KINDS}
"""`events.event_type` -> proto enum number."""
MODEL_INDEX_BY_PROTO: dict[int, EventType] = {kind.proto: kind.model_index for kind in EVENT_KINDS}
"""Proto enum number -> row of the event-type embedding."""

EVENT_NAMES: tuple[str, ...] = tuple(kind.name for kind in EVENT_KINDS)
"""Every value `events.event_type` may hold."""
ITEM_EVENT_NAMES: tuple[str, ...] = tuple(kind.name for kind in EVENT_KINDS if kind.has_item)
"""The kinds that are interactions with an item (what item statistics count and the model learns)."""
