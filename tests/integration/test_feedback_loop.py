"""The feedback loop end to end: real collector, features, ranker and consistency processes, real
Postgres and etcd. Recommend -> IngestEvents with the answer's recommendation_id -> the
consistency service's delta-stream join counts it for that version and variant (OnlineMetrics and
Prometheus), the figures survive a restart of the consistency service, and its decider loop
promotes a clearly better canary and aborts a clearly worse one, each decision landing in etcd,
model_versions and History.

Tests run in file order on one stack (module scope).
"""
from __future__ import annotations

import json
import random
import uuid

import pytest
import sqlalchemy as sa

from deltarec.v1 import (collector_pb2, collector_pb2_grpc, common_pb2, consistency_pb2, consistency_pb2_grpc,
                         ranker_pb2, ranker_pb2_grpc)
from scripts.launch import ServiceProcess
from services.common.artifacts import ArtifactStore
from services.common.etcd import Etcd
from services.contracts.etcd_keys import MODEL_CANARY, MODEL_CURRENT, ranker_key
from services.feedback.variant_outcomes import VARIANT_OUTCOMES_FIELD, outcomes_from_registrations
from services.contracts.model_pointer import ModelPointer
from tests import fakes
from tests.integration.test_service_plumbing import metric_samples
from tests.support import channel_to, wait_until

pytestmark = pytest.mark.integration

N_ITEMS = 80
ITEM_IDS = [f"item-{n}" for n in range(N_ITEMS)]
CLICK, PURCHASE = common_pb2.EVENT_TYPE_CLICK, common_pb2.EVENT_TYPE_PURCHASE
MIN_IMPRESSIONS = 120


def title_of(n: int) -> str:
    return f"{['Rose', 'Amber', 'Cedar', 'Mint'][n % 4]} {['Balm', 'Cream', 'Oil', 'Serum'][n % 3]} {n}"


class Stack:
    def __init__(self, env, engine, etcd, store, collector, ranker, logs):
        self.env, self.engine, self.etcd, self.store = env, engine, etcd, store
        self.collector, self.ranker, self.logs = collector, ranker, logs
        self.text = fakes.text_vectors([title_of(n) for n in range(N_ITEMS)])
        self.consistency_process: ServiceProcess | None = None
        self.consistency = None
        self.events = 0

    def start_consistency(self) -> None:
        self.consistency_process = ServiceProcess("services.consistency", {
            **self.env, "COLLECTOR_ADDRESS": self.collector_address, "CONSISTENCY_CHECK_INTERVAL_S": "0",
            "CANARY_DECIDE_INTERVAL_S": "0.5", "CANARY_MIN_IMPRESSIONS": str(MIN_IMPRESSIONS),
            "FEEDBACK_HOLD_S": "20", "FEEDBACK_EXPORT_INTERVAL_S": "0.2"}, name="consistency",
            log_dir=self.logs).start(timeout_s=120)
        self.consistency = consistency_pb2_grpc.ConsistencyServiceStub(channel_to(self.consistency_process))

    def artifact(self, version: int) -> dict:
        spec = fakes.store_artifact(self.store, fakes.make_artifact(version, ITEM_IDS, self.text, dim=16,
                                                                    popular=ITEM_IDS[:40]))
        with self.engine.begin() as connection:     # the lineage row the trainer writes
            connection.execute(sa.text(
                "INSERT INTO model_versions (version, strategy, status, sha256, artifact_uri) "
                "VALUES (:v, 'full', 'published', :sha, :uri)"), {"v": version, "sha": spec["sha256"],
                                                                   "uri": spec["uri"]})
        return spec

    def publish_canary(self, version: int, share: float = 0.5) -> None:
        spec = self.artifact(version)
        self.etcd.put(MODEL_CANARY, {**spec, "share": share})
        wait_until(lambda: self.status().canary_version == version, f"the ranker to load canary v{version}")

    def status(self):
        return self.ranker.Status(ranker_pb2.RankerServiceStatusRequest(), timeout=10)

    def metrics(self, **fields) -> consistency_pb2.OnlineMetricsResponse:
        return self.consistency.OnlineMetrics(consistency_pb2.OnlineMetricsRequest(**fields), timeout=30)

    def figures(self, version: int, variant: str):
        for row in self.metrics().variants:
            if row.model_version == version and row.variant == variant:
                return row
        return None

    def shop(self, users: list[str], click_rate: dict[str, float], seed: int) -> dict[str, int]:
        """Each user asks for recommendations once and clicks the answer's third item with the
        variant's probability (sometimes buys it too); returns the impressions per variant."""
        rng, shown, events = random.Random(seed), {"current": 0, "canary": 0}, []
        for user in users:
            answer = self.ranker.Recommend(ranker_pb2.RecommendRequest(user_id=user, k=5), timeout=30)
            assert answer.recommendation_id
            shown[answer.variant.name] += 1
            if rng.random() < click_rate[answer.variant.name]:
                self.events += 1
                item = answer.items[2].item_id
                events.append(common_pb2.Event(event_id=f"fb-{self.events}", type=CLICK, user_id=user,
                                               item_id=item, recommendation_id=answer.recommendation_id))
        for start in range(0, len(events), 500):
            self.collector.IngestEvents(collector_pb2.IngestEventsRequest(events=events[start:start + 500]),
                                        timeout=60)
        return shown


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
    stack = None
    try:
        collector_process = ServiceProcess("services.collector", env, log_dir=logs).start()
        processes.append(collector_process)
        collector = collector_pb2_grpc.CollectorServiceStub(channel_to(collector_process))
        collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=[
            common_pb2.Item(item_id=ITEM_IDS[n], title=title_of(n), category="Beauty", brand="Belle", active=True)
            for n in range(N_ITEMS)]), timeout=60)
        features_process = ServiceProcess("services.features", {
            **env, "COLLECTOR_ADDRESS": collector_process.address, "FEATURES_TORCH_THREADS": "1"},
            log_dir=logs).start(timeout_s=240)
        processes.append(features_process)
        stack = Stack(env, engine, etcd, store, collector, None, logs)
        stack.collector_address = collector_process.address
        fakes.publish(etcd, stack.artifact(1))
        ranker_process = ServiceProcess("services.ranker", {
            **env, "FEATURES_ADDRESS": features_process.address, "RANKER_REPLICA_ID": "ranker-fb",
            "RANKER_REGISTER_INTERVAL_S": "0.5"}, name="ranker", log_dir=logs).start(timeout_s=240)
        processes.append(ranker_process)
        stack.ranker = ranker_pb2_grpc.RankerServiceStub(channel_to(ranker_process))
        wait_until(lambda: stack.status().freshness.model_version == 1, "the ranker to serve v1")
        stack.start_consistency()
        yield stack
    finally:
        if stack is not None and stack.consistency_process is not None:
            stack.consistency_process.stop(timeout_s=20)
        for process in reversed(processes):
            process.stop(timeout_s=20)
        etcd.close()
        engine.dispose()


def test_an_event_with_the_answers_id_is_counted_for_its_version_and_variant(stack):
    answer = stack.ranker.Recommend(ranker_pb2.RecommendRequest(user_id="alice", k=5), timeout=30)
    assert answer.variant.name == "current" and answer.variant.model_version == 1
    shown = [item.item_id for item in answer.items]
    # At once: the ranker flushes the impression about a second later, so the event usually
    # reaches the join first and is held until its impression comes.
    stack.collector.IngestEvents(collector_pb2.IngestEventsRequest(events=[
        common_pb2.Event(event_id="alice-1", type=CLICK, user_id="alice", item_id=shown[1],
                         recommendation_id=answer.recommendation_id),
        common_pb2.Event(event_id="alice-2", type=PURCHASE, user_id="alice", item_id=shown[1],
                         recommendation_id=answer.recommendation_id),
        common_pb2.Event(event_id="alice-3", type=CLICK, user_id="alice", item_id="item-not-shown",
                         recommendation_id=answer.recommendation_id)]), timeout=30)
    wait_until(lambda: (stack.figures(1, "current") or consistency_pb2.VariantMetrics()).purchase_impressions == 1,
               "the purchase to be attributed to v1 current", timeout_s=60)
    row = stack.figures(1, "current")
    assert row.impressions == 1 and row.clicked_impressions == 1 and row.clicks == 1
    assert row.click_through_rate == 1.0 and row.purchase_rate == 1.0
    assert list(row.clicks_at_position) == [0, 1]
    assert row.position_weighted_gain == pytest.approx(1 / 1.584962500721156)   # 1/log2(3)
    response = stack.metrics()
    assert response.consumer_running and response.applied_lsn > 0
    assert response.attributed_events == 2 and response.unattributed.item_not_shown == 1
    assert response.pending_events == 0
    assert response.canary.state == "no_canary" and response.canary.decider_running
    # Prometheus, with the version and the variant as labels.
    labels = (("model_version", "1"), ("variant", "current"))
    wait_until(lambda: metric_samples(stack.consistency_process).get(("deltarec_online_impressions", labels)) == 1,
               "the gauges to be exported")
    samples = metric_samples(stack.consistency_process)
    assert samples[("deltarec_online_click_through_rate", labels)] == 1.0
    assert samples[("deltarec_online_purchase_rate", labels)] == 1.0


def test_requests_are_checked_naming_the_field(stack):
    import grpc
    for fields, name in (({"window_s": -1}, "window_s"), ({"window_s": 10 ** 7}, "window_s"),
                         ({"variant": "blue"}, "variant")):
        with pytest.raises(grpc.RpcError) as error:
            stack.metrics(**fields)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in error.value.details()


def test_the_window_is_the_same_after_a_restart(stack):
    before = stack.figures(1, "current")
    stack.consistency_process.stop(timeout_s=20)
    assert stack.consistency_process.process.returncode == 0          # graceful shutdown
    stack.start_consistency()
    wait_until(lambda: stack.metrics().consumer_running, "the feedback stream to resume")
    after = stack.figures(1, "current")
    assert after == before
    assert stack.metrics().attributed_events == 2


def test_the_loop_promotes_a_clearly_better_canary(stack):
    stack.publish_canary(2)
    users = [f"shopper-{n}" for n in range(4 * MIN_IMPRESSIONS)]
    shown = stack.shop(users, {"current": 0.05, "canary": 0.6}, seed=1)
    assert min(shown.values()) >= MIN_IMPRESSIONS, shown
    wait_until(lambda: stack.etcd.get(MODEL_CANARY) is None, "the decider loop to decide", timeout_s=120)
    current = ModelPointer.from_json(stack.etcd.get(MODEL_CURRENT).value)
    assert current.version == 2
    _assert_recorded(stack, 2, "promote")
    response = stack.metrics()
    assert response.canary.last_decision.canary_model_version == 2
    assert response.canary.last_decision.action == "promote"
    # The decision may come before the last impressions do: every one is counted in the end.
    wait_until(lambda: stack.figures(2, "canary").impressions == shown["canary"], "every impression to be counted")
    assert stack.figures(2, "canary").click_through_rate > 0.4


def test_the_loop_aborts_a_clearly_worse_canary(stack):
    wait_until(lambda: stack.status().freshness.model_version == 2, "the ranker to serve v2")
    stack.publish_canary(3)
    users = [f"buyer-{n}" for n in range(4 * MIN_IMPRESSIONS)]
    shown = stack.shop(users, {"current": 0.6, "canary": 0.05}, seed=2)
    assert min(shown.values()) >= MIN_IMPRESSIONS, shown
    wait_until(lambda: stack.etcd.get(MODEL_CANARY) is None, "the decider loop to decide", timeout_s=120)
    assert ModelPointer.from_json(stack.etcd.get(MODEL_CURRENT).value).version == 2
    _assert_recorded(stack, 3, "abort")


def _decision_row(stack, version: int):
    with stack.engine.connect() as connection:
        return connection.execute(sa.text(
            "SELECT canary_decision, canary_evidence FROM model_versions WHERE version = :v"), {"v": version}).one()


def _assert_recorded(stack, version: int, action: str) -> None:
    # The decider records in Postgres right after its etcd transaction.
    wait_until(lambda: _decision_row(stack, version).canary_decision is not None, "the decision to be recorded")
    row = _decision_row(stack, version)
    assert row.canary_decision == action
    test = row.canary_evidence["evidence"]["test"]
    assert test["significant"] and test["p_value"] < 0.05
    history = stack.consistency.History(consistency_pb2.HistoryRequest(kind="canary"), timeout=30).entries
    mine = [entry for entry in history if json.loads(entry.detail_json)["canary_version"] == version]
    assert len(mine) == 1 and mine[0].kind == "canary" and action in mine[0].detail


def test_health_and_the_state_say_the_loop_runs(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    response = stack.metrics()
    assert response.canary.decider_running and response.canary.decide_interval_s == 0.5
    assert response.canary.holds_decider_lease            # the only instance: it wrote the decisions
    health = health_pb2_grpc.HealthStub(channel_to(stack.consistency_process)).Check(
        health_pb2.HealthCheckRequest(service="deltarec.v1.ConsistencyService"), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    samples = metric_samples(stack.consistency_process)
    assert samples[("deltarec_canary_decider_running", ())] == 1
    assert samples[("deltarec_canary_decisions_total", (("action", "promote"), ("written", "yes")))] == 1
    assert samples[("deltarec_canary_decisions_total", (("action", "abort"), ("written", "yes")))] == 1


def test_the_loop_aborts_a_canary_whose_error_rate_rises(stack):
    """The error-rate abort reads the rankers' registrations: a second replica (its registration
    written here, as a replica whose canary fails a third of its requests would publish it) is
    enough, whatever the click figures say (too few impressions for the sequential test)."""
    wait_until(lambda: stack.status().freshness.model_version == 2, "the ranker to serve v2")
    stack.publish_canary(4)
    shown = stack.shop([f"visitor-{n}" for n in range(20)], {"current": 0.0, "canary": 0.0}, seed=3)
    assert shown["canary"] > 0, shown

    def own_canary_requests() -> int:
        value = json.loads(stack.etcd.get(ranker_key("ranker-fb")).value)
        return outcomes_from_registrations([value]).get((4, "canary"), (0, 0))[0]
    wait_until(lambda: own_canary_requests() == shown["canary"], "the replica to publish its counts")
    failing_replica = ranker_key("ranker-failing")
    stack.etcd.put(failing_replica, {"replica_id": "ranker-failing", "model_version": 2, VARIANT_OUTCOMES_FIELD: [
        {"model_version": 2, "variant": "current", "requests": 1000, "errors": 2},
        {"model_version": 4, "variant": "canary", "requests": 300, "errors": 100}]})
    try:
        wait_until(lambda: stack.etcd.get(MODEL_CANARY) is None, "the decider loop to abort", timeout_s=120)
    finally:
        stack.etcd.delete(failing_replica)
    assert ModelPointer.from_json(stack.etcd.get(MODEL_CURRENT).value).version == 2
    wait_until(lambda: _decision_row(stack, 4).canary_decision is not None, "the decision to be recorded")
    row = _decision_row(stack, 4)
    assert row.canary_decision == "abort" and "error rate" in row.canary_evidence["reason"]
    assert row.canary_evidence["evidence"]["canary"]["errors"] >= 100
    # the real replica's own counts are in the sum too: the requests it answered for v4
    assert row.canary_evidence["evidence"]["canary"]["requests"] > 300


def _figures(response) -> dict:
    return {(r.model_version, r.variant): (r.impressions, r.clicked_impressions, r.clicks) for r in response.variants}


def test_a_standby_instance_takes_the_stream_over_with_the_window_exact(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    first_process, first = stack.consistency_process, stack.consistency
    stack.start_consistency()                                   # a second instance: it stands by
    second_process, second = stack.consistency_process, stack.consistency
    request = consistency_pb2.OnlineMetricsRequest()
    wait_until(lambda: "standing by" in second.OnlineMetrics(request, timeout=30).consumer_detail,
               "the second instance to stand by")
    health = health_pb2_grpc.HealthStub(channel_to(second_process)).Check(
        health_pb2.HealthCheckRequest(service="deltarec.v1.ConsistencyService"), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING   # standing by is not a fault
    # Traffic while the first instance holds the stream: the second has it only by rebuilding at
    # the takeover (the first acked it).
    before = _figures(first.OnlineMetrics(request, timeout=30))
    shown = stack.shop([f"late-{n}" for n in range(30)], {"current": 1.0, "canary": 1.0}, seed=3)
    wait_until(lambda: _figures(first.OnlineMetrics(request, timeout=30))[(2, "current")][0]
               == before[(2, "current")][0] + shown["current"], "the first instance to count the traffic")
    held = _figures(first.OnlineMetrics(request, timeout=30))
    first_process.stop(timeout_s=20)
    wait_until(lambda: second.OnlineMetrics(request, timeout=30).consumer_running, "the standby to take over")
    wait_until(lambda: _figures(second.OnlineMetrics(request, timeout=30)) == held,
               "the standby's window to equal the holder's", timeout_s=30)


def test_without_the_collector_online_metrics_say_why_and_bad_settings_stop_the_start(start_service, service_env):
    import subprocess
    import sys

    import grpc

    from scripts.launch import REPO_ROOT
    process = start_service("services.consistency", {**service_env, "CONSISTENCY_CHECK_INTERVAL_S": "0"})
    stub = consistency_pb2_grpc.ConsistencyServiceStub(channel_to(process))
    with pytest.raises(grpc.RpcError) as error:
        stub.OnlineMetrics(consistency_pb2.OnlineMetricsRequest(), timeout=30)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "COLLECTOR_ADDRESS" in error.value.details()
    for bad, name in (({"CANARY_DECIDE_INTERVAL_S": "-1"}, "CANARY_DECIDE_INTERVAL_S"),
                      ({"FEEDBACK_WINDOW_S": "60", "FEEDBACK_BUCKET_S": "120"}, "FEEDBACK_BUCKET_S"),
                      ({"CANARY_ALPHA": "2"}, "CANARY_ALPHA")):
        result = subprocess.run([sys.executable, "-m", "services.consistency"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=60,
                                env={**service_env, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'gen'}", **bad})
        assert result.returncode == 2, result.stderr[-500:]
        assert name in result.stderr and len(result.stderr.strip().splitlines()) == 1
