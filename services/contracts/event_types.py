"""The event-type vocabulary shared by every service: proto enum number <-> name <-> model index.

The model index is the row of the event-type embedding (0 = padding); the proto numbers are those
of `deltarec.v1.EventType`.
"""

from __future__ import annotations

import enum


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
