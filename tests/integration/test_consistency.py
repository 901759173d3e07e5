"""The consistency service end to end: real collector, features, two rankers and the consistency
service as processes, real Postgres and etcd. Each test makes one kind of drift happen for real,
shows that Check reports exactly it, and that Reconcile mends it (a second Check is clean).

Tests run in file order on one stack (module scope); each leaves the suite consistent.
"""
from __future__ import annotations

import json
import os
import signal
import uuid

import grpc
import pytest
import sqlalchemy as sa

from deltarec.v1 import (collector_pb2, collector_pb2_grpc, common_pb2, consistency_pb2, consistency_pb2_grpc,
                         ranker_pb2, ranker_pb2_grpc)
from scripts.launch import ServiceProcess
from services.common.artifacts import ArtifactStore
from services.common.etcd import Etcd
from services.consistency.sources import Sources
from services.contracts.etcd_keys import MODEL_CANARY, MODEL_CURRENT, ranker_key
from tests import fakes
from tests.support import channel_to, wait_until, wal_lsn

pytestmark = pytest.mark.integration

N_ITEMS = 60
N_USERS = 12
ITEM_IDS = [f"item-{n}" for n in range(N_ITEMS)]
DROPPED_BY_R2 = "item-7"       # the ranker r2's fault drill drops the first live upsert of it
ERROR, WARNING = consistency_pb2.SEVERITY_ERROR, consistency_pb2.SEVERITY_WARNING
KINDS = [common_pb2.EVENT_TYPE_VIEW, common_pb2.EVENT_TYPE_PURCHASE, common_pb2.EVENT_TYPE_CLICK]


def title_of(n: int) -> str:
    return f"{['Rose', 'Amber', 'Cedar', 'Mint'][n % 4]} {['Balm', 'Cream', 'Oil'][n % 3]} {n}"


class Stack:
    def __init__(self, env, engine, etcd, store, collector, consistency, processes, logs):
        self.env, self.engine, self.etcd, self.store = env, engine, etcd, store
        self.collector, self.consistency, self.processes, self.logs = collector, consistency, processes, logs
        self.rankers: dict[str, ServiceProcess] = {}
        self.text = fakes.text_vectors([title_of(n) for n in range(N_ITEMS)])

    def check(self, *checks: str) -> consistency_pb2.CheckResponse:
        return self.consistency.Check(consistency_pb2.CheckRequest(checks=list(checks)), timeout=120)

    def reconcile(self, dry_run: bool = False, drop_slots=()) -> consistency_pb2.ReconcileResponse:
        request = consistency_pb2.ReconcileRequest(dry_run=dry_run, drop_slots=list(drop_slots))
        return self.consistency.Reconcile(request, timeout=300)

    def publish(self, version: int, *, corrupt: bool = False) -> dict:
        spec = fakes.store_artifact(self.store, fakes.make_artifact(version, ITEM_IDS, self.text, dim=16))
        with self.engine.begin() as connection:     # the lineage row the trainer writes
            connection.execute(sa.text(
                "INSERT INTO model_versions (version, parent_version, strategy, status, decision, sha256, "
                "artifact_uri, lsn_to) VALUES (:v, :p, 'full', 'published', 'test', :sha, :uri, :lsn)"),
                {"v": version, "p": version - 1 if version > 1 else None, "sha": spec["sha256"],
                 "uri": spec["uri"], "lsn": spec["data_lsn"]})
        if corrupt:
            path = spec["uri"][len("file://"):]
            with open(path, "r+b") as handle:
                handle.seek(100)
                handle.write(b"\x00corrupted\x00")
        fakes.publish(self.etcd, spec)
        return spec

    def ranker(self, replica: str) -> ranker_pb2_grpc.RankerServiceStub:
        return ranker_pb2_grpc.RankerServiceStub(channel_to(self.rankers[replica]))

    def serving(self, replica: str) -> int:
        status = self.ranker(replica).Status(ranker_pb2.RankerServiceStatusRequest(), timeout=10)
        return status.freshness.model_version

    def wait_serving(self, version: int) -> None:
        for replica in self.rankers:
            wait_until(lambda r=replica: self.serving(r) == version, f"{replica} to serve v{version}")

    def caught_up(self) -> None:
        """Features, the trainer's log and every ranker have applied everything written so far."""
        target = wal_lsn(self.engine)
        wait_until(lambda: self.applied() >= target, "features to catch up")
        wait_until(lambda: self.applied("trainer") >= target, "the trainer's log to catch up")
        for replica in self.rankers:
            wait_until(lambda r=replica: self.ranker(r).Status(ranker_pb2.RankerServiceStatusRequest(),
                                                               timeout=10).freshness.data_lsn >= target,
                       f"{replica} to catch up")

    def applied(self, consumer: str = "features") -> int:
        return Sources(self.engine).applied_lsn(consumer)


def bad(response) -> list:
    return [f for f in response.findings if f.severity in (WARNING, ERROR)]


def only(response):
    """The one warning-or-error finding of a report."""
    found = bad(response)
    assert len(found) == 1, [f"{f.check} {f.subject}: {f.detail} {list(f.keys)}" for f in found]
    return found[0]


def assert_clean(response) -> None:
    assert response.consistent, [f"{f.check} {f.subject}: {f.detail}" for f in bad(response)]


@pytest.fixture(scope="module")
def stack(infra_env, database_url, tmp_path_factory):
    prefix = f"/test-{uuid.uuid4().hex[:10]}/"
    logs = tmp_path_factory.mktemp("logs")
    env = {"DATABASE_URL": database_url, "ETCD_ENDPOINT": infra_env.etcd_endpoint, "ETCD_PREFIX": prefix,
           "GRPC_PORT": "0", "METRICS_PORT": "0", "LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_S": "2",
           "COLLECTOR_HEARTBEAT_S": "0.5"}
    processes: list[ServiceProcess] = []
    etcd = Etcd(infra_env.etcd_endpoint, prefix)
    engine = sa.create_engine(database_url)
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts").as_uri())
    try:
        collector_process = ServiceProcess("services.collector", env, log_dir=logs).start()
        processes.append(collector_process)
        collector = collector_pb2_grpc.CollectorServiceStub(channel_to(collector_process))
        collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=[
            common_pb2.Item(item_id=ITEM_IDS[n], title=title_of(n), category="Beauty", brand="Belle",
                            active=True) for n in range(N_ITEMS)]), timeout=60)
        collector.IngestEvents(collector_pb2.IngestEventsRequest(events=[
            common_pb2.Event(event_id=f"seed-{u}-{i}", type=KINDS[i % 3],
                             user_id=f"user-{u}", item_id=ITEM_IDS[(u * 5 + i) % N_ITEMS])
            for u in range(N_USERS) for i in range(4)]), timeout=60)
        features_process = ServiceProcess("services.features", {
            **env, "COLLECTOR_ADDRESS": collector_process.address, "FEATURES_TORCH_THREADS": "1"},
            log_dir=logs).start(timeout_s=240)
        processes.append(features_process)
        # The trainer only records the delta stream here (no loop): its interaction log is checked.
        processes.append(ServiceProcess("services.trainer", {
            **env, "COLLECTOR_ADDRESS": collector_process.address, "TRAINER_LOOP": "0",
            "TRAINER_TORCH_THREADS": "1",
            "TRAINER_ARTIFACT_URI": tmp_path_factory.mktemp("trainer-artifacts").as_uri()},
            log_dir=logs).start(timeout_s=240))
        consistency_process = ServiceProcess("services.consistency", {
            **env, "FEATURES_ADDRESS": features_process.address,
            "COLLECTOR_ADDRESS": collector_process.address, "CONSISTENCY_CHECK_INTERVAL_S": "0",
            "CONSISTENCY_VERSION_GRACE_S": "3", "CONSISTENCY_SETTLE_S": "8",
            "CONSISTENCY_SLOT_ABANDONED_S": "0", "CONSISTENCY_INSTANCE_ID": "consistency-a"},
            name="consistency", log_dir=logs).start()
        processes.append(consistency_process)
        consistency = consistency_pb2_grpc.ConsistencyServiceStub(channel_to(consistency_process))
        stack = Stack(env, engine, etcd, store, collector, consistency, processes, logs)
        stack.features_address = features_process.address
        stack.features_process = features_process
        stack.consistency_process = consistency_process
        stack.publish(1)
        # r2 runs with the failure drill that makes it lose an upsert (tests/ranker_drills.py).
        for replica, module, extra in (("r1", "services.ranker", {}),
                                       ("r2", "tests.ranker_drills", {"RANKER_DRILL_DROP_FEED_ITEM": DROPPED_BY_R2})):
            process = ServiceProcess(module, {
                **env, "FEATURES_ADDRESS": features_process.address, "RANKER_REPLICA_ID": replica,
                "RANKER_REGISTER_INTERVAL_S": "0.5", "RANKER_LEASE_TTL_S": "120", **extra},
                name=f"ranker-{replica}", log_dir=logs).start(timeout_s=240)
            processes.append(process)
            stack.rankers[replica] = process
        stack.wait_serving(1)
        yield stack
    finally:
        for process in reversed(processes):
            process.stop(timeout_s=20)
        etcd.close()
        engine.dispose()


def test_a_clean_suite_is_consistent(stack):
    stack.caught_up()
    report = stack.check()
    assert_clean(report)
    assert report.watermark > 0 and report.current_model_version == 1
    assert {r.replica_id for r in report.replicas} == {"r1", "r2"}
    assert all(r.answering for r in report.replicas)
    sides = {(d.kind, d.side): d for d in report.digests}
    assert sides[("catalog_items", "catalog")].root == sides[("catalog_items", "feature_store")].root
    assert sides[("catalog_items", "catalog")].rows == N_ITEMS
    index_roots = {d.root for d in report.digests if d.kind == "index_items"}
    assert len(index_roots) == 1                        # feature store and both rankers agree
    assert sides[("user_events", "events")].rows == N_USERS
    assert report.source_checksum == report.feature_store_checksum


def test_interactions_missing_from_the_trainers_log_are_found(stack):
    with stack.engine.begin() as connection:
        saved = connection.execute(sa.text("DELETE FROM trainer_interactions WHERE user_id = 'user-2' "
                                           "RETURNING *")).mappings().all()
    finding = only(stack.check())
    assert (finding.check, list(finding.keys), finding.repairable) == ("trainer_events", ["user-2"], False)
    with stack.engine.begin() as connection:        # put them back as the trainer had them
        columns = list(saved[0].keys())
        connection.execute(sa.text(f"INSERT INTO trainer_interactions ({', '.join(columns)}) "
                                   f"VALUES ({', '.join(':' + c for c in columns)})"),
                           [dict(r) for r in saved])
    assert_clean(stack.check())


def test_an_item_features_row_changed_by_sql_is_found_and_re_embedded(stack):
    with stack.engine.begin() as connection:
        connection.execute(sa.text(
            "UPDATE item_features SET content_hash = 'written by hand' WHERE item_id = 'item-3'"))
    report = stack.check()
    finding = only(report)
    assert (finding.check, finding.severity, list(finding.keys)) == ("catalog_features", ERROR, ["item-3"])
    assert "content hash" in finding.detail and finding.repairable
    dry = stack.reconcile(dry_run=True)
    assert [a.done for a in dry.actions] == [False] and "re-embed 1 item" in dry.actions[0].action
    assert not stack.check("catalog_features").consistent        # the dry run changed nothing
    response = stack.reconcile()
    assert [a.done for a in response.actions] == [True]
    stack.caught_up()
    assert_clean(stack.check())


def test_a_deleted_item_features_row_is_found_and_restored(stack):
    with stack.engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM item_features WHERE item_id = 'item-5'"))
    report = stack.check()
    finding = only(report)
    assert (finding.check, list(finding.keys)) == ("catalog_features", ["item-5"])
    assert "no current embedding" in finding.detail
    assert stack.reconcile().after.consistent
    stack.caught_up()
    assert_clean(stack.check())


def test_a_ranker_that_missed_an_upsert_is_found_and_resynced(stack):
    stack.collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=[common_pb2.Item(
        item_id=DROPPED_BY_R2, title="Velvet Night Serum, new formula", category="Beauty", brand="Belle",
        active=True)]), timeout=30)
    stack.caught_up()                                   # r2's watermark passes the upsert it dropped
    report = stack.check()
    finding = only(report)
    assert (finding.check, finding.subject, list(finding.keys)) == ("features_index", "r2", [DROPPED_BY_R2])
    assert "loss, not lag" in finding.detail and "another vector" in finding.detail
    response = stack.reconcile()
    assert [(a.subject, a.done) for a in response.actions] == [("r2", True)]
    assert_clean(stack.check())


def test_a_change_in_flight_is_lag_not_drift(stack):
    """While features is stopped, a catalog change it has not applied is reported as lag."""
    features_pid = stack.features_process.process.pid
    os.kill(features_pid, signal.SIGSTOP)
    try:
        stack.collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=[common_pb2.Item(
            item_id="item-11", title="Amber Oil 11, larger bottle", category="Beauty", brand="Belle",
            active=True)]), timeout=30)
        report = stack.check("catalog_features")
    finally:
        os.kill(features_pid, signal.SIGCONT)
    finding = only(report)
    assert (finding.severity, list(finding.keys)) == (WARNING, ["item-11"])
    assert "lag, not drift" in finding.detail
    stack.caught_up()
    assert_clean(stack.check())


def test_a_user_whose_applied_history_was_deleted_is_rebuilt(stack):
    with stack.engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM user_features WHERE user_id = 'user-3'"))
        # A state without any event: the rebuild empties it (keeps the row, so that WatchUsers
        # announces it), and an empty row counts as no row.
        connection.execute(sa.text(
            "INSERT INTO user_features (user_id, history, counters, recent_queries, updated_lsn) "
            "SELECT 'user-ghost', history, counters, recent_queries, updated_lsn FROM user_features "
            "WHERE user_id = 'user-4'"))
        connection.execute(sa.text(
            "UPDATE user_features SET counters = jsonb_set(counters, '{view}', "
            "to_jsonb(COALESCE((counters->>'view')::int, 0) + 1)) WHERE user_id = 'user-4'"))
    report = stack.check()
    finding = only(report)
    assert (finding.check, list(finding.keys)) == ("user_events", ["user-3", "user-4", "user-ghost"])
    assert "never applied" in finding.detail and "applied twice" in finding.detail
    assert finding.lsn_to >= finding.lsn_from > 0
    response = stack.reconcile()
    assert [a.done for a in response.actions] == [True] and "rebuilt 2 user" in response.actions[0].action
    assert_clean(stack.check())
    with stack.engine.connect() as connection:
        assert connection.execute(sa.text(
            "SELECT history::text || counters::text FROM user_features WHERE user_id = 'user-ghost'")).scalar() == "[]{}"

    # The rebuild is exact under the stream's rules: new events are counted once.
    stack.collector.IngestEvents(collector_pb2.IngestEventsRequest(events=[common_pb2.Event(
        event_id="after-rebuild", type=common_pb2.EVENT_TYPE_VIEW, user_id="user-3", item_id="item-1")]),
        timeout=30)
    stack.caught_up()
    assert_clean(stack.check("user_events"))


def test_rollback_end_to_end(stack):
    stack.publish(2)
    stack.wait_serving(2)
    response = stack.consistency.Rollback(consistency_pb2.RollbackRequest(version=1), timeout=60)
    assert (response.previous_version, response.current_version) == (2, 1)
    stack.wait_serving(1)
    assert json.loads(stack.etcd.get(MODEL_CURRENT).value)["version"] == 1
    with stack.engine.connect() as connection:
        rows = dict(connection.execute(sa.text(
            "SELECT version, status || ':' || COALESCE(rolled_back_to::text, '') FROM model_versions")).all())
    assert rows == {1: "published:", 2: "rolled_back:1"}
    history = stack.consistency.History(consistency_pb2.HistoryRequest(limit=5, kind="rollback"), timeout=10)
    assert history.entries[0].detail == "model/current v2 -> v1"
    assert_clean(stack.check())
    for version, code in ((99, grpc.StatusCode.NOT_FOUND), (0, grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as error:
            stack.consistency.Rollback(consistency_pb2.RollbackRequest(version=version), timeout=10)
        assert error.value.code() == code


def test_a_corrupt_current_artifact_is_found_and_rolled_back(stack):
    stack.publish(3, corrupt=True)
    def refusal_outlasts_grace() -> bool:
        return any(f.check == "model_version" and f.severity == ERROR for f in stack.check().findings)
    wait_until(refusal_outlasts_grace, "the replicas' refusal to outlast the grace period")
    report = stack.check()
    checks = sorted({(f.check, f.subject) for f in bad(report)})
    assert checks == [("artifact", "model/current"), ("model_version", "r1"), ("model_version", "r2")]
    artifact = next(f for f in bad(report) if f.check == "artifact")
    assert "fails verification" in artifact.detail and artifact.model_version == 3
    response = stack.reconcile()
    assert all(a.done for a in response.actions), [a.action for a in response.actions]
    assert json.loads(stack.etcd.get(MODEL_CURRENT).value)["version"] == 1
    stack.wait_serving(1)
    assert_clean(stack.check())


def test_an_invalid_canary_is_found_and_aborted(stack):
    stack.etcd.put(MODEL_CANARY, json.dumps({**json.loads(stack.etcd.get(MODEL_CURRENT).value), "version": 1,
                                             "share": 1.5}))
    finding = only(stack.check("model_version"))
    assert finding.subject == MODEL_CANARY and "share" in finding.detail and finding.repairable
    response = stack.reconcile()
    assert [a.done for a in response.actions] == [True] and stack.etcd.get(MODEL_CANARY) is None
    assert_clean(stack.check())


def test_a_slot_without_consumer_is_reported_and_dropped_only_when_named(stack):
    with stack.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("SELECT pg_create_logical_replication_slot('forgotten_slot', 'pgoutput')"))
    report = stack.check("replication")
    finding = only(report)
    assert finding.subject == "forgotten_slot" and "abandoned" in finding.detail
    response = stack.reconcile()
    assert not [a for a in response.actions if a.done]
    assert not stack.check("replication").consistent             # never dropped unless named
    response = stack.reconcile(drop_slots=["forgotten_slot"])
    assert [(a.subject, a.done) for a in response.actions] == [("forgotten_slot", True)]
    assert_clean(stack.check())


def test_a_killed_rankers_lingering_registration_is_deleted(stack):
    os.kill(stack.rankers["r2"].process.pid, signal.SIGKILL)
    stack.rankers["r2"].process.wait(timeout=30)
    del stack.rankers["r2"]
    assert stack.etcd.get(ranker_key("r2")) is not None             # its lease lives on for a while
    report = stack.check()
    finding = only(report)
    assert (finding.subject, finding.repairable) == ("r2", True) and "does not answer" in finding.detail
    response = stack.reconcile()
    assert [(a.subject, a.done) for a in response.actions] == [("r2", True)]
    assert stack.etcd.get(ranker_key("r2")) is None
    assert_clean(stack.check())


def test_only_the_lease_holder_repairs_and_history_is_newest_first(stack):
    second = ServiceProcess("services.consistency", {**stack.env, "CONSISTENCY_CHECK_INTERVAL_S": "0",
                                                     "CONSISTENCY_INSTANCE_ID": "consistency-b"},
                            name="consistency-b", log_dir=stack.logs).start()
    try:
        stub = consistency_pb2_grpc.ConsistencyServiceStub(channel_to(second))
        assert stub.Check(consistency_pb2.CheckRequest(checks=["catalog_features"]), timeout=60).consistent
        with pytest.raises(grpc.RpcError) as error:
            stub.Reconcile(consistency_pb2.ReconcileRequest(), timeout=60)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "consistency-a" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            stub.Rollback(consistency_pb2.RollbackRequest(version=1), timeout=60)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        second.stop(timeout_s=20)
    entries = stack.consistency.History(consistency_pb2.HistoryRequest(limit=100), timeout=10).entries
    times = [e.at.ToNanoseconds() for e in entries]
    assert times == sorted(times, reverse=True)
    assert {"check", "reconcile", "rollback"} <= {e.kind for e in entries}
    with pytest.raises(grpc.RpcError) as error:
        stack.consistency.History(consistency_pb2.HistoryRequest(kind="nonsense"), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
