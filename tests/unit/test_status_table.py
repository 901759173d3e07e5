"""services/status: target expansion and the table, without servers (the manifest smoke test runs
the command against the live suite)."""
from __future__ import annotations

from services.status.collect import GroupRow, Health, RankerRow, Snapshot, VersionRow, addresses
from services.status.table import render


def test_targets_expand_to_every_address_behind_them():
    assert addresses("127.0.0.1:5") == ["127.0.0.1:5"]
    assert addresses("ipv4:10.0.0.1:80,10.0.0.2:80") == ["10.0.0.1:80", "10.0.0.2:80"]
    assert addresses("dns:///127.0.0.1:7") == ["127.0.0.1:7"]
    assert addresses("a:1,b:2") == ["a:1", "b:2"]


def _snapshot(**changes) -> Snapshot:
    snapshot = Snapshot(
        health=[Health("collector", "10.0.0.1:8080", "SERVING"), Health("ranker", "10.0.0.5:8080", "NOT_SERVING")],
        current={"version": 4}, canary={"version": 5, "share": 0.1}, watermark={"lsn": 0x16B3740},
        rankers=[RankerRow("ranker-a", "10.0.0.5:8080", 4, 0x16B3740, 12101, "ab" * 32),
                 RankerRow("ranker-b", "10.0.0.6:8080", 3, 0x16B3000, 12101, "cd" * 32, refused="v4: sha256 mismatch",
                           source="etcd")],
        groups=[GroupRow("features", 0x16B3740, 2048, True, "collector-a", True),
                GroupRow("old", 0x100, 5 * 1024 ** 3, False, "", True)],
        trainer={"leader_id": "trainer-0", "current_version": 4, "latest_version": 5, "busy": False,
                 "pending_interactions": 12, "recorded_lsn": 0},
        versions=[VersionRow(5, 4, "threshold", "rejected", 0.031, 0.036, "gate: ndcg_at_10 below tolerance"),
                  VersionRow(4, 3, "threshold", "published", 0.036, 0.035, "published")])
    for name, value in changes.items():
        setattr(snapshot, name, value)
    return snapshot


def test_the_table_shows_each_part_and_marks_what_is_wrong():
    text = render(_snapshot())
    assert "model/current v4" in text and "model/canary v5 share 10%" in text and "data/watermark 0/16B3740" in text
    lines = text.splitlines()
    assert any(line.startswith("collector") and "SERVING" in line for line in lines)
    assert any(line.startswith("! ranker") and "NOT_SERVING" in line for line in lines)
    # the replica behind model/current and with a refused artifact is marked; versions disagree
    assert any(line.startswith("! ranker-b") and "v4: sha256 mismatch" in line and "etcd" in line for line in lines)
    assert any(line.startswith("ranker-a") and "abababababab" in line for line in lines)
    assert "! replicas disagree on the model version: [3, 4]" in text
    # an idle group retaining WAL
    assert any(line.startswith("! old") and "5.0 GiB" in line and "NOT STREAMING" in line for line in lines)
    # the trainer's versions with their gate outcome
    assert any(line.startswith("v5") and "rejected" in line and "below tolerance" in line for line in lines)
    assert "leader trainer-0" in text


def test_an_unreachable_part_is_one_line_not_a_crash():
    text = render(_snapshot(rankers=[], groups=[], trainer=None, versions=[], errors=["etcd: connection refused"]))
    assert "(no ranker registered in etcd)" in text
    assert "! etcd: connection refused" in text


def test_a_features_service_without_its_text_model_yet_says_so():
    features = {"applied_lsn": 0x16B3740, "lag_bytes": 0, "lag_seconds": 0.0, "active_items": 10, "users": 3,
                "connected": True, "snapshot_done": True, "text_model_state": "loading"}
    assert "! text model loading" in render(_snapshot(features=features))
    assert "text model" not in render(_snapshot(features={**features, "text_model_state": "ready"}))
