"""The consistency core's rules, without servers: lag vs drift (settle), the grace period,
repair planning and dry runs, rollback refusals."""
from __future__ import annotations

import json

import pytest

from services.common.errors import Aborted, FailedPrecondition, NotFound
from services.consistency import findings as fn
from services.consistency.checker import Checker, CheckSettings, Observations
from services.consistency.findings import Finding, Report, Severity, plain_words
from services.consistency.repair import Repairer
from services.consistency.replicas import Registration
from services.consistency.rollback import Rollbacks
from services.consistency.sources import Row
from services.contracts.etcd_keys import MODEL_CURRENT


class FakeSources:
    def __init__(self, applied: list[int], wal: int = 100) -> None:
        self.applied, self.wal = list(applied), wal

    def wal_lsn(self) -> int:
        return self.wal

    def applied_lsn(self, consumer: str) -> int:
        return self.applied.pop(0) if len(self.applied) > 1 else self.applied[0]


class KV:
    def __init__(self, value: bytes) -> None:
        self.value = value


class FakeEtcd:
    def __init__(self, values: dict[str, bytes] | None = None) -> None:
        self.values = dict(values or {})

    def get(self, key):
        return KV(self.values[key]) if key in self.values else None

    def get_prefix(self, prefix):
        return []

    def compare_and_swap(self, key, expected, new):
        current = self.values.get(key)
        if current != expected:
            return False
        self.values[key] = new
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def checker(sources, etcd=None, registrations=(), versions=None, **settings) -> Checker:
    class Replicas:
        def registrations(self):
            return list(registrations)
    c = Checker(sources, etcd or FakeEtcd(), Replicas(), versions or (lambda v: None),
                settings=CheckSettings(**{"settle_s": 0.5, **settings}), sleep=lambda s: None)
    c.registrations = list(registrations)
    return c


def reader(*states):
    """A read function returning the given key -> Row maps on successive calls."""
    calls = list(states)

    def read(keys):
        return calls.pop(0) if len(calls) > 1 else calls[0]
    return read


def test_a_difference_that_stays_once_the_consumer_passed_it_is_drift():
    c = checker(FakeSources([50, 100]))
    left = reader({"a": Row(("h1",), "x1")})
    right = reader({"a": Row(("h0",), "y1")})
    settled = c.settle(["a"], left, right, "features")
    assert settled.drift == ["a"] and settled.reached and not settled.lag


def test_a_difference_the_consumer_has_not_reached_is_lag():
    c = checker(FakeSources([50]))
    settled = c.settle(["a"], reader({"a": Row(("h1",), "x1")}), reader({}), "features")
    assert settled.lag == ["a"] and not settled.drift and not settled.reached


def test_a_difference_that_resolves_or_moves_is_in_flight():
    c = checker(FakeSources([100]))
    left = reader({"a": Row(("h1",), "x1"), "b": Row(("h1",), "x1")},
                  {"a": Row(("h1",), "x1"), "b": Row(("h2",), "x2")})
    right = reader({"a": Row(("h0",), "y1"), "b": Row(("h0",), "y1")},
                   {"a": Row(("h1",), "y2"), "b": Row(("h0",), "y1")})
    settled = c.settle(["a", "b"], left, right, "features")
    assert sorted(settled.in_flight) == ["a", "b"] and not settled.drift


def test_inactive_counts_as_absent():
    c = checker(FakeSources([100]))
    settled = c.settle(["a"], reader({"a": Row(("inactive",), "x")}), reader({}), "features")
    assert settled.in_flight == ["a"]


def pointer(version: int, sha: str = "a" * 64) -> bytes:
    return json.dumps({"version": version, "uri": f"file:///m{version}", "sha256": sha, "data_lsn": 1,
                       "metrics": {}}, sort_keys=True).encode()


def test_a_replica_on_another_version_is_ok_within_grace_then_an_error():
    clock = Clock()
    etcd = FakeEtcd({MODEL_CURRENT: pointer(4)})
    registration = Registration("r2", {"model_version": 3, "address": "x:1"}, b"{}")
    c = checker(FakeSources([1]), etcd, [registration],
                versions=lambda v: {"status": "published", "sha256": "a" * 64}, version_grace_s=30)
    c.observations = Observations(clock)
    report = Report()
    c.check_model_versions(report)
    assert [f.severity for f in report.findings] == [Severity.OK]
    clock.now += 45
    report = Report()
    c.check_model_versions(report)
    (finding,) = report.findings
    assert finding.severity is Severity.ERROR and finding.repair == "reload_model"
    assert "ranker r2 serves v3, current is v4, for 45 s" in finding.detail
    assert not report.consistent


def test_current_naming_an_unpublished_version_is_an_error():
    etcd = FakeEtcd({MODEL_CURRENT: pointer(5)})
    c = checker(FakeSources([1]), etcd, versions=lambda v: {"status": "rejected", "sha256": "a" * 64})
    report = Report()
    c.check_model_versions(report)
    assert report.findings[0].severity is Severity.ERROR and "rejected" in report.findings[0].detail


def test_current_naming_a_promoted_canary_not_yet_settled_is_a_note():
    """Between the decider's promotion and the trainer's next look the row is still a candidate."""
    etcd = FakeEtcd({MODEL_CURRENT: pointer(5)})
    promoted = {"status": "candidate", "canary_decision": "promote", "sha256": "a" * 64}
    c = checker(FakeSources([1]), etcd, versions=lambda v: promoted)
    report = Report()
    c.check_model_versions(report)
    assert [f.severity for f in report.findings] == [Severity.OK] and report.consistent
    undecided = {"status": "candidate", "canary_decision": "", "sha256": "a" * 64}
    report = Report()
    checker(FakeSources([1]), etcd, versions=lambda v: undecided).check_model_versions(report)
    assert report.findings[0].severity is Severity.ERROR


def test_consistent_only_without_warnings_and_errors():
    report = Report(findings=[Finding("x", Severity.OK, "s", "fine")])
    assert report.consistent
    report.add(Finding("x", Severity.WARNING, "s", "lag"))
    assert not report.consistent


def test_plain_words_names_keys():
    line = plain_words(Finding(fn.CATALOG_FEATURES, Severity.ERROR, "item_features", "2 items stale",
                               keys=["b", "a"]))
    assert line.startswith("ERROR") and "[a, b]" in line


def finding(repair: str, target: str = "", keys=()) -> Finding:
    return Finding("c", Severity.ERROR, target or "s", "d", repairable=True, keys=list(keys), repair=repair,
                   target=target)


def test_plan_orders_repairs_and_drops_only_named_slots():
    report = Report(findings=[finding("delete_registration", "r1"), finding("drop_slot", "slot_a"),
                              finding("resync_index", "r2"), finding("resync_items", keys=["i"]),
                              finding("drop_slot", "slot_b"), Finding("c", Severity.OK, "s", "fine")])
    repairer = Repairer(FakeEtcd(), None, None)
    planned = [f.repair + ":" + f.target for f, _ in repairer.plan(report, ["slot_b"])]
    assert planned == ["resync_items:", "resync_index:r2", "delete_registration:r1", "drop_slot:slot_b"]


def test_dry_run_does_nothing_and_says_so():
    report = Report(findings=[finding("resync_items", keys=["i1", "i2"])])
    actions = Repairer(FakeEtcd(), None, None).reconcile(report, dry_run=True, drop_slots=["nope"])
    assert [a.done for a in actions] == [False, False]
    assert "not dropped" in actions[0].outcome and "re-embed 2 item(s)" in actions[1].action


class FakeVersions:
    def __init__(self, rows: dict[int, dict]) -> None:
        self.rows, self.recorded = rows, []

    def get(self, version):
        return self.rows.get(version)

    def record_rollback(self, from_version, to_version, reason):
        self.recorded.append((from_version, to_version))


def test_rollback_refusals(tmp_path):
    artifact = tmp_path / "m1"
    artifact.write_bytes(b"model one")
    import hashlib
    sha = hashlib.sha256(b"model one").hexdigest()
    rows = {1: {"version": 1, "status": "published", "artifact_uri": artifact.as_uri(), "sha256": sha,
                "lsn_to": 5},
            2: {"version": 2, "status": "rejected", "artifact_uri": artifact.as_uri(), "sha256": sha},
            3: {"version": 3, "status": "published", "artifact_uri": artifact.as_uri(), "sha256": "0" * 64}}
    etcd = FakeEtcd({MODEL_CURRENT: pointer(3)})
    rollbacks = Rollbacks(etcd, FakeVersions(rows))
    with pytest.raises(NotFound):
        rollbacks.rollback(9)
    with pytest.raises(FailedPrecondition, match="never published"):
        rollbacks.rollback(2)
    with pytest.raises(FailedPrecondition, match="fails verification"):
        rollbacks.rollback(3)
    result = rollbacks.rollback(1)
    assert (result.previous_version, result.current_version, result.changed) == (3, 1, True)
    assert json.loads(etcd.values[MODEL_CURRENT])["version"] == 1
    assert rollbacks.versions.recorded == [(3, 1)]
    assert not rollbacks.rollback(1).changed


def test_rollback_loses_a_race_without_overwriting(tmp_path):
    artifact = tmp_path / "m1"
    artifact.write_bytes(b"m")
    import hashlib
    rows = {1: {"version": 1, "status": "published", "artifact_uri": artifact.as_uri(),
                "sha256": hashlib.sha256(b"m").hexdigest()}}

    class RacingEtcd(FakeEtcd):
        def compare_and_swap(self, key, expected, new):
            self.values[key] = pointer(7)       # another writer got there first
            return False
    etcd = RacingEtcd({MODEL_CURRENT: pointer(3)})
    with pytest.raises(Aborted):
        Rollbacks(etcd, FakeVersions(rows)).rollback(1)
    assert json.loads(etcd.values[MODEL_CURRENT])["version"] == 7
