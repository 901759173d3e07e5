"""Anonymous sessions: the items of the current visit (in order) as a history the user tower reads.

A storefront often has no user id yet. `Recommend(session=[...])` answers from the session's
interactions through the same user tower, filters and reasons as a known user's history; with a
user id too, the session's events (not ingested yet, or not applied yet) follow the stored
history. Only item interactions count (view, click, add_to_cart, purchase); the seen and
purchased sets of the answer's filters include the session's items.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

from services.common.errors import InvalidArgument
from services.contracts.event_types import BY_PROTO
from services.ranker.user_cache import CachedUser, UserHistory

MAX_SESSION_EVENTS = 200
MAX_ITEM_ID_BYTES = 128
# Session timestamps are the client's: a little skew is tolerated, the future is not.
MAX_FUTURE_S = 300.0


@dataclass(frozen=True)
class SessionEvent:
    item_id: str
    proto_type: int                 # deltarec.v1.EventType number
    timestamp: float | None = None  # seconds since the epoch; None = now


def check_session(events: Sequence[SessionEvent]) -> tuple[SessionEvent, ...]:
    """The session as given, or INVALID_ARGUMENT naming the first bad field."""
    if len(events) > MAX_SESSION_EVENTS:
        raise InvalidArgument(f"session: at most {MAX_SESSION_EVENTS} events, got {len(events)}")
    now = time.time()
    for position, event in enumerate(events):
        name = f"session[{position}]"
        if not event.item_id:
            raise InvalidArgument(f"{name}.item_id: required")
        if len(event.item_id.encode()) > MAX_ITEM_ID_BYTES:
            raise InvalidArgument(f"{name}.item_id: at most {MAX_ITEM_ID_BYTES} bytes")
        kind = BY_PROTO.get(event.proto_type)
        if kind is None or not kind.has_item:
            raise InvalidArgument(f"{name}.type: must be an item interaction (VIEW, CLICK, ADD_TO_CART "
                                  f"or PURCHASE), got {event.proto_type}")
        if event.timestamp is not None and event.timestamp > now + MAX_FUTURE_S:
            raise InvalidArgument(f"{name}.timestamp: in the future")
    return tuple(events)


def session_history(session: Sequence[SessionEvent], base: UserHistory | None = None) -> UserHistory:
    """`base` (a known user's stored state; None = anonymous) followed by the session."""
    base = base or UserHistory()
    if not session:
        return base
    now = time.time()
    item_ids = tuple(event.item_id for event in session)
    events = tuple(int(BY_PROTO[event.proto_type].model_index) for event in session)
    stamps = tuple(now if event.timestamp is None else event.timestamp for event in session)
    purchased = tuple(event.item_id for event in session
                      if BY_PROTO[event.proto_type].name == "purchase")
    return replace(base, item_ids=base.item_ids + item_ids, event_types=base.event_types + events,
                   timestamps=base.timestamps + stamps,
                   seen_item_ids=base.seen_item_ids + item_ids,
                   purchased_item_ids=base.purchased_item_ids + purchased)


def with_session(cached: CachedUser | None, session: Sequence[SessionEvent], data_lsn: int) -> CachedUser:
    """A request-local entry: the user's (or nobody's) state plus the session; its memos are its
    own (the cached user's vector does not include the session)."""
    base = cached.history if cached is not None else UserHistory(data_lsn=data_lsn)
    return CachedUser(session_history(session, base), time.monotonic())
