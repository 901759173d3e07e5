"""The trainer's edge conversions and delta decoding (pure: no server, database or etcd)."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from deltarec.v1 import trainer_pb2
from services.common.errors import InvalidArgument
from services.trainer.interaction_log import interaction_from_row
from services.contracts.model_pointer import ModelPointer
from services.trainer.publisher import Current, artifact_name
from services.trainer.server import strategy_from_request, version_message
from services.trainer.strategies import Strategy
from services.trainer.versions import VersionRow


def test_unset_share_and_ratio_mean_their_documented_default():
    strategy = strategy_from_request(trainer_pb2.UpdateStrategy(window_seconds=60, priority="recency"))
    assert strategy == Strategy(window_seconds=60, priority="recency", top_share=1.0, replay_ratio=1.0)


@pytest.mark.parametrize("message, field", [
    (trainer_pb2.UpdateStrategy(priority="loudest"), "strategy.priority"),
    (trainer_pb2.UpdateStrategy(top_share=1.5), "strategy.top_share"),
    (trainer_pb2.UpdateStrategy(replay_ratio=-1.0), "strategy.replay_ratio"),
    (trainer_pb2.UpdateStrategy(top_share=float("nan")), "strategy.top_share"),
])
def test_bad_strategies_are_invalid_arguments_naming_the_field(message, field):
    with pytest.raises(InvalidArgument, match=field):
        strategy_from_request(message)


def test_version_message_maps_every_column():
    row = VersionRow(version=7, parent_version=6, strategy="window+priority",
                     parameters={"window_seconds": 3600, "priority": "recency", "top_share": 0.5,
                                 "replay_ratio": 2.0, "seed": 3, "examples": 10},
                     lsn_from=100, lsn_to=200, metrics={"recall_at_10": 0.25, "ndcg_at_10": 0.125, "users": 40},
                     baseline_metrics={"ndcg_at_10": 0.12, "users": 40}, train_seconds=1.5, sha256="ab" * 32,
                     artifact_uri="file:///x", status="rejected", decision="rejected by the gate",
                     interactions=1000, items=64, created_at=datetime(2024, 1, 2, tzinfo=timezone.utc),
                     baseline_version=6)
    message = version_message(row)
    assert message.status == trainer_pb2.VERSION_STATUS_REJECTED and message.baseline_version == 6
    assert message.parameters.window_seconds == 3600 and message.parameters.top_share == 0.5
    assert message.metrics.recall_at_10 == 0.25 and message.metrics.users == 40
    assert (message.lsn_from, message.lsn_to, message.items) == (100, 200, 64)
    assert message.created_at.ToDatetime(tzinfo=timezone.utc) == row.created_at


def test_events_delta_rows_become_interactions():
    row = {"id": 42.0, "event_id": "e-1", "event_type": "add_to_cart", "user_id": "u", "item_id": "i",
           "occurred_at": "2024-03-01T09:30:00.5+00:00", "query": None}
    interaction = interaction_from_row(row, commit_lsn=99)
    assert interaction.row_id == 42 and interaction.commit_lsn == 99 and interaction.event_type == "add_to_cart"
    assert interaction.occurred_at == datetime(2024, 3, 1, 9, 30, 0, 500000, tzinfo=timezone.utc).timestamp()
    assert interaction_from_row({**row, "occurred_at": "2024-03-01 09:30:00Z"}).occurred_at == \
        datetime(2024, 3, 1, 9, 30, tzinfo=timezone.utc).timestamp()
    # a search has no item: the model has no use for it
    assert interaction_from_row({**row, "event_type": "search", "item_id": None, "query": "lip balm"}) is None


def test_current_value_is_the_documented_json_and_names_are_content_addressed():
    raw = ModelPointer(3, "file:///a", "f" * 64, 1234, metrics={"ndcg_at_10": 0.1}).to_json()
    assert json.loads(raw) == {"version": 3, "uri": "file:///a", "sha256": "f" * 64, "data_lsn": 1234,
                               "metrics": {"ndcg_at_10": 0.1}}
    assert Current(raw, ModelPointer.from_json(raw)).version == 3 and Current(None, None).version == 0
    assert artifact_name(3, "0123456789abcdef" * 4) == "model-v000003-0123456789abcdef.pt"
