"""The ranker's side of attribution: name each answer with a fresh recommendation_id and hand
its impression to the buffer (no I/O on the request path: an id, a tuple and a deque append)."""
from __future__ import annotations

import time

from services.feedback.impressions import ImpressionBuffer
from services.feedback.online_metrics import Impression
from services.feedback.recommendation_id import new_text


class Attribution:
    def __init__(self, buffer: ImpressionBuffer) -> None:
        self.buffer = buffer

    def stamp(self, answer, kind: str, user_id: str) -> str:
        """The answer's recommendation_id; its impression is queued for the impressions table."""
        text = new_text(answer.model_version, answer.variant, kind)
        self.buffer.offer(Impression(text, answer.model_version, answer.variant, user_id,
                                     tuple([item.item_id for item in answer.items]), time.time(), kind))
        return text
