"""The opaque `recommendation_id` every Recommend, Search and SimilarItems answer carries.

22 url-safe characters: base64 of 16 bytes = model version (uint32), variant (1 byte), the kind
of answer (1 byte), and a 10-byte random nonce. The facts of the answer that an event needs to be
attributed (which version and variant answered) travel inside the id, so an event is attributed
even when its impression was lost; which items were shown, at which positions and to whom, is
in the impression stored under the id (impressions.py). Ids are unique by their nonce (80
random bits); the storefront treats them as opaque strings.
"""
from __future__ import annotations

import base64
import os
import struct
from dataclasses import dataclass

VARIANTS = ("current", "canary")
KINDS = ("recommend", "search", "similar")
LENGTH = 22
EVENT_ATTRIBUTE = "deltarec.recommendation_id"
"""Where the collector stores an event's recommendation_id: the events row's `attributes` (so it
travels on the delta stream with the event); reserved, a client cannot set it as an attribute."""
_LAYOUT = struct.Struct(">IBB10s")


class InvalidRecommendationId(ValueError):
    """Not an id a ranker handed out; the message says why."""


@dataclass(frozen=True)
class RecommendationId:
    model_version: int
    variant: str
    kind: str
    nonce: bytes

    def encode(self) -> str:
        raw = _LAYOUT.pack(self.model_version, VARIANTS.index(self.variant), KINDS.index(self.kind), self.nonce)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def new_id(model_version: int, variant: str, kind: str) -> RecommendationId:
    return RecommendationId(int(model_version) & 0xFFFFFFFF, variant, kind, os.urandom(10))


_VARIANT_INDEX = {name: index for index, name in enumerate(VARIANTS)}
_KIND_INDEX = {name: index for index, name in enumerate(KINDS)}


def new_text(model_version: int, variant: str, kind: str) -> str:
    """`new_id(...).encode()` without the intermediate object: the request path's call (every
    answer makes one). 16 bytes are 24 base64 characters, the last two padding."""
    raw = _LAYOUT.pack(model_version & 0xFFFFFFFF, _VARIANT_INDEX[variant], _KIND_INDEX[kind], os.urandom(10))
    return base64.urlsafe_b64encode(raw)[:LENGTH].decode()


def parse(text: str) -> RecommendationId:
    if len(text) != LENGTH:
        raise InvalidRecommendationId(f"recommendation_id: {len(text)} characters, expected {LENGTH}")
    try:
        raw = base64.urlsafe_b64decode(text + "==")
    except (ValueError, TypeError):
        raise InvalidRecommendationId("recommendation_id: not url-safe base64") from None
    if len(raw) != _LAYOUT.size:
        raise InvalidRecommendationId("recommendation_id: not url-safe base64")
    version, variant, kind, nonce = _LAYOUT.unpack(raw)
    if variant >= len(VARIANTS) or kind >= len(KINDS):
        raise InvalidRecommendationId("recommendation_id: not one this service handed out")
    return RecommendationId(version, VARIANTS[variant], KINDS[kind], nonce)
