"""The feedback consumer's edge without servers: which delta rows reach the join, and a standby
that takes the stream over rebuilds before it applies anything (the holder acked what came in
between, so the stream resumes past what its start-up rebuild saw)."""
from __future__ import annotations

from datetime import datetime, timezone

from google.protobuf import struct_pb2

from deltarec.v1 import collector_pb2
from services.consistency.feedback_stream import FeedbackSettings, FeedbackStream
from services.feedback.recommendation_id import EVENT_ATTRIBUTE

NOW = 1_800_000_000.0
SHOWN = datetime.fromtimestamp(NOW - 5, timezone.utc).isoformat()


def _struct(values: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _delta(table: str, row: dict, op=collector_pb2.OPERATION_INSERT) -> collector_pb2.Delta:
    return collector_pb2.Delta(table=table, op=op, new_row=_struct(row))


def _stream() -> FeedbackStream:
    stream = FeedbackStream(None, "127.0.0.1:1", "feedback", FeedbackSettings(), clock=lambda: NOW)
    stream.rebuilt = 0

    def rebuild():                                  # no Postgres here: an empty window
        stream.join = stream._new_join()
        stream.rebuilt += 1
    stream.rebuild = rebuild
    return stream


def test_rows_reach_the_join_only_for_inserts_of_attributed_events_and_impressions():
    stream = _stream()
    impression = {"recommendation_id": "r1", "model_version": 2, "variant": "current", "user_id": "u",
                  "item_ids": ["a", "b"], "shown_at": SHOWN, "kind": "recommend"}
    click = {"event_id": "e1", "event_type": "click", "item_id": "a", "occurred_at": SHOWN,
             "attributes": {EVENT_ATTRIBUTE: "r1"}}
    plain = dict(click, event_id="e2", attributes={})
    stream.apply_batch(collector_pb2.DeltaBatch(commit_lsn=10, deltas=[
        _delta("impressions", impression), _delta("events", click), _delta("events", plain),
        _delta("events", dict(click, event_id="e3"), op=collector_pb2.OPERATION_DELETE)]))
    figures = stream.window()[(2, "current")]
    assert figures.impressions == 1 and figures.clicked == 1 and stream.join.counts["attributed"] == 1


def test_a_standby_taking_over_rebuilds_before_it_applies():
    stream = _stream()
    stream.on_heartbeat(collector_pb2.Heartbeat(server_lsn=5, standby=True, holder="other"))
    assert stream.rebuilt == 0
    stream.apply_batch(collector_pb2.DeltaBatch(commit_lsn=20))
    assert stream.rebuilt == 1
    stream.apply_batch(collector_pb2.DeltaBatch(commit_lsn=30))
    assert stream.rebuilt == 1                       # once per takeover
    stream.on_heartbeat(collector_pb2.Heartbeat(server_lsn=40, standby=True))
    stream.on_heartbeat(collector_pb2.Heartbeat(server_lsn=41, caught_up_lsn=41))
    assert stream.rebuilt == 2
