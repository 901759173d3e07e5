"""The contracts that are not protos: the event-type table, the etcd keys, the model pointer."""
from __future__ import annotations

import json

import pytest

from deltarec.v1 import common_pb2
from services.contracts import etcd_keys
from services.contracts.event_types import (BY_NAME, EVENT_KINDS, EVENT_NAMES, ITEM_EVENT_NAMES,
                                            MODEL_INDEX_BY_PROTO, NAME_BY_PROTO, PROTO_BY_NAME, EventType)
from services.contracts.model_pointer import InvalidPointer, ModelPointer
from services.features.item_stats import EVENT_WEIGHTS

SHA = "ab" * 32


def test_every_proto_event_type_but_unspecified_has_exactly_one_kind():
    numbers = {value.number for value in common_pb2.EventType.DESCRIPTOR.values} - {0}
    assert set(NAME_BY_PROTO) == numbers and len(EVENT_KINDS) == len(numbers)
    assert all(PROTO_BY_NAME[NAME_BY_PROTO[n]] == n for n in numbers)
    # the model index is the enum member of the same name; PAD (0) is no event
    assert all(kind.model_index.name == kind.name.upper() for kind in EVENT_KINDS)
    assert MODEL_INDEX_BY_PROTO[common_pb2.EVENT_TYPE_PURCHASE] == EventType.PURCHASE
    assert BY_NAME["search"].proto_name == "EVENT_TYPE_SEARCH" and not BY_NAME["search"].has_item
    assert ITEM_EVENT_NAMES == ("view", "click", "add_to_cart", "purchase")
    assert EVENT_NAMES == ITEM_EVENT_NAMES + ("search",)
    assert set(EVENT_WEIGHTS) == set(ITEM_EVENT_NAMES)   # features weighs every item interaction


def test_etcd_keys_are_the_documented_names():
    assert etcd_keys.MODEL_CURRENT == "model/current" and etcd_keys.MODEL_CANARY == "model/canary"
    assert etcd_keys.MODEL_CURRENT.startswith(etcd_keys.MODEL_PREFIX)
    assert etcd_keys.DATA_WATERMARK == "data/watermark" and etcd_keys.TRAINER_LEADER == "trainer/leader"
    assert etcd_keys.ranker_key("r-1") == "rankers/r-1"
    assert etcd_keys.collector_slot_key("features") == "collector/slots/features"


def test_model_pointer_writes_the_documented_json_and_reads_it_back():
    pointer = ModelPointer(3, "file:///a", SHA, 1234, metrics={"ndcg_at_10": 0.1})
    raw = pointer.to_json()
    assert json.loads(raw) == {"version": 3, "uri": "file:///a", "sha256": SHA, "data_lsn": 1234,
                               "metrics": {"ndcg_at_10": 0.1}}
    assert raw == json.dumps(json.loads(raw), sort_keys=True).encode()   # a CAS compares bytes
    assert ModelPointer.from_json(raw) == pointer and ModelPointer.from_json(raw.decode()) == pointer
    assert ModelPointer.from_json(raw).metrics == {"ndcg_at_10": 0.1}
    canary = ModelPointer(4, "file:///b", SHA, share=0.25)
    assert json.loads(canary.to_json(canary=True))["share"] == 0.25
    assert ModelPointer.from_json(canary.to_json(canary=True), canary=True).share == 0.25
    # a share means nothing in model/current
    assert ModelPointer.from_json(canary.to_json(canary=True)).share == 0.0
    assert pointer.same_artifact(ModelPointer(3, "file:///elsewhere", SHA))
    assert not pointer.same_artifact(ModelPointer(3, "file:///a", "cd" * 32)) and not pointer.same_artifact(None)


@pytest.mark.parametrize("value, field", [
    (b"not json", "not JSON"), ([1, 2], "not a JSON object"),
    ({"uri": "file:///a", "sha256": SHA}, "version"),
    ({"version": 1, "sha256": SHA}, "uri"),
    ({"version": 1, "uri": "file:///a"}, "sha256"),
    ({"version": 0, "uri": "file:///a", "sha256": SHA}, "version"),
    ({"version": "x", "uri": "file:///a", "sha256": SHA}, "version"),
    ({"version": 1.5, "uri": "file:///a", "sha256": SHA}, "version"),
    ({"version": 1, "uri": "", "sha256": SHA}, "uri"),
    ({"version": 1, "uri": "file:///a", "sha256": "abc"}, "sha256"),
    ({"version": 1, "uri": "file:///a", "sha256": SHA, "data_lsn": -1}, "data_lsn"),
    ({"version": 1, "uri": "file:///a", "sha256": SHA, "metrics": [1]}, "metrics"),
])
def test_a_malformed_pointer_is_refused_naming_the_field(value, field):
    with pytest.raises(InvalidPointer, match=field):
        ModelPointer.from_json(value if isinstance(value, bytes) else json.dumps(value))


def test_a_canary_share_outside_zero_to_one_is_refused():
    with pytest.raises(InvalidPointer, match="share"):
        ModelPointer.from_json({"version": 1, "uri": "file:///a", "sha256": SHA, "share": 2}, canary=True)
