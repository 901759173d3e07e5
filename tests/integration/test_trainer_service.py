"""The trainer against real Postgres, real etcd and real gRPC (`python -m services.trainer`).

Each test gets a database and an etcd prefix of its own. Interactions are put into the
trainer's interaction log the way the delta-stream consumer does (`InteractionLog.record`: rows
and LSN high-water mark in one transaction), except in the last test, where the trainer records
them from the real collector's delta stream itself. Models are tiny (env settings below), so
every run takes a second or two; nothing here asserts on time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import uuid

import grpc
import numpy as np
import pytest
import sqlalchemy as sa

from deltarec.v1 import collector_pb2, collector_pb2_grpc, common_pb2, trainer_pb2, trainer_pb2_grpc
from services.common.artifacts import ArtifactStore, read_verified
from services.common.etcd import Etcd
from services.model.artifact import deserialize
from services.trainer.interaction_log import InteractionLog
from services.contracts.etcd_keys import MODEL_CURRENT
from services.contracts.model_pointer import ModelPointer
from services.trainer.publisher import Publisher
from scripts import datasets, infra
from tests.support import REPO_ROOT, channel_to, wait_until

pytestmark = pytest.mark.integration

PUBLISHED = trainer_pb2.VERSION_STATUS_PUBLISHED
REJECTED = trainer_pb2.VERSION_STATUS_REJECTED
CANDIDATE = trainer_pb2.VERSION_STATUS_CANDIDATE

TINY_MODEL = {
    "TRAINER_MODEL_EPOCHS": "15", "TRAINER_MODEL_INCREMENTAL_EPOCHS": "3", "TRAINER_MODEL_DIM": "16",
    "TRAINER_MODEL_LAYERS": "1", "TRAINER_MODEL_HEADS": "1", "TRAINER_MODEL_MAX_LEN": "20",
    "TRAINER_MODEL_NEGATIVES": "-1", "TRAINER_MODEL_BATCH_SIZE": "32", "TRAINER_TORCH_THREADS": "1",
    "TRAINER_TEXT_FALLBACK": "hash", "TRAINER_EVAL_USERS": "40", "TRAINER_LEADER_TTL_S": "2",
    "TRAINER_LOOP": "0", "TRAINER_STRATEGY_THRESHOLD": "1",
    # The gate is exercised by its own test; elsewhere an update of a tiny model must not be
    # refused for a noisy point of NDCG.
    "TRAINER_GATE_TOLERANCE": "1.0", "TRAINER_GATE_CUMULATIVE_TOLERANCE": "1.0", "TRAINER_GATE_MIN_USERS": "10",
    # the loop's quick first model and shadow retrains: exercised by the loop test
    "TRAINER_FIRST_EPOCHS": "0", "TRAINER_SHADOW_FULL_EVERY": "0",
}


# ---------------------------------------------------------------------------------- fixtures

@pytest.fixture
def own_database(infra_env):
    name = "t_" + uuid.uuid4().hex[:12]
    url = infra.create_database(infra_env, name)
    engine = sa.create_engine(url)
    yield url, engine
    engine.dispose()
    infra.drop_database(infra_env, name)


@pytest.fixture
def trainer_env(infra_env, own_database, etcd_prefix, tmp_path) -> dict[str, str]:
    url, _ = own_database
    return {"DATABASE_URL": url, "ETCD_ENDPOINT": infra_env.etcd_endpoint, "ETCD_PREFIX": etcd_prefix,
            "GRPC_PORT": "0", "METRICS_PORT": "0", "LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_S": "2",
            "TRAINER_ARTIFACT_URI": (tmp_path / "artifacts").as_uri(), **TINY_MODEL}


@pytest.fixture
def etcd(infra_env, etcd_prefix):
    client = Etcd(infra_env.etcd_endpoint, etcd_prefix)
    yield client
    client.close()


def engine_of(own_database):
    return own_database[1]


def seed(engine, rows, lsn: int, catalog_rows=()) -> None:
    """Catalog rows, feature-store vectors for half of them (the other half exercises the
    trainer's own text fallback), and interactions recorded at `lsn`."""
    with engine.begin() as connection:
        for index, (item_id, title, category) in enumerate(catalog_rows):
            connection.execute(sa.text(
                "INSERT INTO items (item_id, title, category) VALUES (:i, :t, :c) ON CONFLICT DO NOTHING"),
                {"i": item_id, "t": title, "c": category})
            if index % 2 == 0:
                vector = np.random.default_rng(index).standard_normal(384).astype("<f4")
                vector /= np.linalg.norm(vector)
                connection.execute(sa.text(
                    "INSERT INTO item_features (item_id, embedding, title) VALUES (:i, :e, :t) "
                    "ON CONFLICT (item_id) DO UPDATE SET embedding = EXCLUDED.embedding"),
                    {"i": item_id, "e": vector.tobytes(), "t": title})
    InteractionLog(engine).record([dataclasses.replace(r, commit_lsn=lsn) for r in rows], lsn)


def first_data(engine) -> None:
    seed(engine, datasets.structured_interactions(n_users=80), 100, datasets.structured_catalog())


def more_data(engine, lsn: int = 200, seed_value: int = 3, prefix: str = "J") -> None:
    seed(engine, datasets.structured_interactions(n_users=30, start=datasets.STRUCTURED_T0 + 50_000 * seed_value,
                                                   user_prefix=f"N{seed_value}", item_prefix=prefix,
                                                   seed=seed_value),
         lsn, datasets.structured_catalog(prefix=prefix))


def stub_of(process) -> trainer_pb2_grpc.TrainerServiceStub:
    return trainer_pb2_grpc.TrainerServiceStub(channel_to(process))


def leader_stub(process):
    stub = stub_of(process)
    wait_until(lambda: stub.Status(trainer_pb2.TrainerServiceStatusRequest(), timeout=5).leader, "leadership")
    return stub


def publishes_of(etcd: Etcd, start_revision: int) -> list[int]:
    """Versions written to model/current since `start_revision`, in order (a sentinel key marks
    the end of the history so the watch has delivered everything before it)."""
    sentinel = f"test-sentinel-{uuid.uuid4().hex[:8]}"
    seen: list[int] = []
    done = threading.Event()

    def on_event(event):
        if event.key == sentinel:
            done.set()
        elif event.key == MODEL_CURRENT and event.value is not None:
            seen.append(json.loads(event.value)["version"])

    etcd.put(sentinel, "end")
    watch = etcd.watch("", on_event, prefix=True, start_revision=start_revision)
    try:
        assert done.wait(30), "etcd watch did not deliver the history"
    finally:
        watch.cancel()
    return seen


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "services.trainer.cli", *args], capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'gen'}"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def get_version(stub, version: int):
    return stub.GetVersion(trainer_pb2.GetVersionRequest(version=version), timeout=10).version


def find_version(stub, version: int):
    """The version, or None while it does not exist yet."""
    try:
        return get_version(stub, version)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def in_background(call) -> None:
    """A call that will never return (the server hangs, then gets killed): a daemon thread."""
    def run():
        try:
            call()
        except grpc.RpcError:
            pass
    threading.Thread(target=run, daemon=True).start()


# ---------------------------------------------------------------------------------- tests

def test_train_update_lineage_and_artifacts(own_database, trainer_env, start_service, etcd):
    engine = engine_of(own_database)
    first_data(engine)
    process = start_service("services.trainer", trainer_env)
    stub = leader_stub(process)

    trained = stub.Train(trainer_pb2.TrainRequest(seed=5, publish=True), timeout=120)
    v1 = trained.version
    assert trained.published and v1.status == PUBLISHED and v1.strategy == "full" and v1.parent_version == 0
    assert (v1.lsn_from, v1.lsn_to) == (0, 100) and v1.interactions == 960 and v1.metrics.users == 40
    assert v1.metrics.recall_at_10 > 0.2           # a real model on learnable data, not noise
    current = etcd.get_json(MODEL_CURRENT)
    assert current == {"version": v1.version, "uri": v1.artifact_uri, "sha256": v1.sha256, "data_lsn": 100,
                       "metrics": current["metrics"]}
    assert current["metrics"]["ndcg_at_10"] == pytest.approx(v1.metrics.ndcg_at_10)
    artifact_v1 = deserialize(read_verified(v1.artifact_uri, v1.sha256))
    assert artifact_v1.version == v1.version and artifact_v1.data_lsn == 100
    assert sorted(artifact_v1.item_vector_ids) == sorted(i for i, _, _ in datasets.structured_catalog())
    artifact_v1.build_model()

    # Deterministic for a seed: same data, same seed, same metrics; recorded only (publish=false).
    again = stub.Train(trainer_pb2.TrainRequest(seed=5, publish=False), timeout=120)
    assert not again.published and again.version.status == CANDIDATE
    assert again.version.metrics == v1.metrics and again.version.version == v1.version + 1
    assert etcd.get_json(MODEL_CURRENT)["version"] == v1.version

    # Incremental update: new users and new items arrive.
    more_data(engine)
    status = stub.Status(trainer_pb2.TrainerServiceStatusRequest(), timeout=5)
    assert status.pending_interactions == 360 and status.recorded_lsn == 200 and status.current_version == v1.version
    strategy = trainer_pb2.UpdateStrategy(priority="item_novelty", top_share=0.8, replay_ratio=1.0)
    updated = stub.Update(trainer_pb2.UpdateRequest(strategy=strategy, publish=True), timeout=120)
    v3 = updated.version
    assert updated.published and not updated.skipped and v3.status == PUBLISHED
    assert v3.parent_version == v1.version and v3.baseline_version == v1.version
    assert (v3.lsn_from, v3.lsn_to) == (100, 200) and v3.strategy == "priority"
    assert v3.parameters.priority == "item_novelty" and v3.parameters.top_share == pytest.approx(0.8)
    # prequential slice: the newest interaction of the users whose latest arrived after v1's cutoff
    assert v3.baseline_metrics.users == v3.metrics.users == 30 and v3.interactions == 1320

    artifact_v3 = deserialize(read_verified(v3.artifact_uri, v3.sha256))
    new_items = [i for i, _, _ in datasets.structured_catalog(prefix="J")]
    # the id table grew: the parent's ids keep their indexes, new items are appended
    assert artifact_v3.item_ids[:len(artifact_v1.item_ids)] == artifact_v1.item_ids
    assert sorted(artifact_v3.item_ids[len(artifact_v1.item_ids):]) == sorted(new_items)
    model = artifact_v3.build_model()
    assert model.num_items == len(artifact_v1.item_ids) + len(new_items)
    new_rows = model.item_id_embedding.weight[len(artifact_v1.item_ids) + 1:]
    assert (new_rows.abs().sum(dim=1) > 0).all()     # trained, not left at the zero row
    vectors = dict(zip(artifact_v3.item_vector_ids, artifact_v3.item_vectors))
    assert all(item in vectors and np.abs(vectors[item]).sum() > 0 for item in new_items)

    skipped = stub.Update(trainer_pb2.UpdateRequest(publish=True), timeout=60)
    assert skipped.skipped and "no new interactions" in skipped.reason

    listed = stub.ListVersions(trainer_pb2.ListVersionsRequest(), timeout=10)
    assert [v.version for v in listed.versions] == [v3.version, again.version.version, v1.version]
    assert listed.current_version == v3.version

    # The CLI: a full training through the Train RPC, then the lineage.
    trained_cli = cli("--address", process.address, "train", "--seed", "5")
    assert f"version {v3.version + 1}  full" in trained_cli and "status candidate" in trained_cli
    listing = cli("--address", process.address, "versions")
    assert f"current version: {v3.version}" in listing and "rejected" not in listing
    with pytest.raises(grpc.RpcError) as error:
        get_version(stub, 999)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        stub.Update(trainer_pb2.UpdateRequest(strategy=trainer_pb2.UpdateStrategy(priority="loudest")), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority" in error.value.details()


def test_gate_rejects_a_damaged_candidate(own_database, trainer_env, start_service, etcd):
    engine = engine_of(own_database)
    first_data(engine)
    process = start_service("services.trainer", trainer_env)
    v1 = leader_stub(process).Train(trainer_pb2.TrainRequest(publish=True), timeout=120).version
    process.stop()

    damaging = start_service("tests.trainer_drills", {**trainer_env, "TRAINER_DRILL_DAMAGE_CANDIDATE": "1",
                                                  "TRAINER_GATE_TOLERANCE": "0.05"}, name="trainer-damaging")
    more_data(engine)
    response = leader_stub(damaging).Update(trainer_pb2.UpdateRequest(publish=True), timeout=120)
    rejected = response.version
    assert not response.published and rejected.status == REJECTED
    assert "rejected by the gate" in rejected.decision
    assert rejected.metrics.users == rejected.baseline_metrics.users == 30
    assert rejected.metrics.ndcg_at_10 < 0.5 * rejected.baseline_metrics.ndcg_at_10
    assert rejected.sha256 and rejected.artifact_uri       # recorded with its artifact, not published
    assert etcd.get_json(MODEL_CURRENT)["version"] == v1.version


def test_cas_refuses_a_stale_publish(own_database, etcd, tmp_path):
    """The publisher against real etcd: a writer that read an old value never overwrites."""
    publisher = Publisher(etcd, ArtifactStore((tmp_path / "a").as_uri()))
    first = publisher.publish(version=1, uri="file:///a1", sha256="a" * 64, data_lsn=10, metrics={}, expected=None)
    assert first.published and not first.already
    raw_v1 = etcd.get(MODEL_CURRENT).value
    assert raw_v1 == ModelPointer(1, "file:///a1", "a" * 64, 10).to_json()

    # Two trainers both saw "no version" / "version 1": the second to arrive loses.
    stale_create = publisher.publish(version=2, uri="file:///a2", sha256="b" * 64, data_lsn=20, metrics={},
                                     expected=None)
    assert not stale_create.published and "version 1" in stale_create.reason
    winner = publisher.publish(version=3, uri="file:///a3", sha256="c" * 64, data_lsn=30, metrics={},
                               expected=raw_v1)
    assert winner.published
    revision = etcd.get(MODEL_CURRENT).mod_revision
    loser = publisher.publish(version=4, uri="file:///a4", sha256="d" * 64, data_lsn=40, metrics={}, expected=raw_v1)
    assert not loser.published and "lost the publish race" in loser.reason and "version 3" in loser.reason
    assert etcd.get_json(MODEL_CURRENT)["version"] == 3 and etcd.get(MODEL_CURRENT).mod_revision == revision
    # Publishing the version that is already current is idempotent: nothing written again.
    repeat = publisher.publish(version=3, uri="file:///a3", sha256="c" * 64, data_lsn=30, metrics={}, expected=raw_v1)
    assert repeat.published and repeat.already and etcd.get(MODEL_CURRENT).mod_revision == revision


def test_stale_publish_after_a_crash_is_refused_not_overwritten(own_database, trainer_env, start_service, etcd):
    """A run that passed the gate, crashed before its CAS, and finds etcd changed meanwhile
    (another writer: here a rollback) is recorded as a lost race; etcd keeps the other value."""
    engine = engine_of(own_database)
    first_data(engine)
    process = start_service("services.trainer", trainer_env)
    v1 = leader_stub(process).Train(trainer_pb2.TrainRequest(publish=True), timeout=120).version
    process.stop()

    more_data(engine)
    hanging = start_service("tests.trainer_drills", {**trainer_env, "TRAINER_DRILL_HANG_AT": "artifact_written"},
                            name="trainer-hang")
    stub = leader_stub(hanging)
    in_background(lambda: stub.Update(trainer_pb2.UpdateRequest(publish=True), timeout=120))
    v2 = wait_until(lambda: (lambda v: v if v is not None and v.sha256 else None)(find_version(stub, v1.version + 1)),
                    "the candidate's artifact")
    other = json.dumps({**etcd.get_json(MODEL_CURRENT), "metrics": {"rolled_back": True}}, sort_keys=True)
    etcd.put(MODEL_CURRENT, other)               # someone else writes model/current meanwhile
    hanging.kill()
    assert v2.status == CANDIDATE

    recovering = start_service("services.trainer", trainer_env, name="trainer-recover")
    stub = stub_of(recovering)
    final = wait_until(lambda: (lambda v: v if v.status != CANDIDATE else None)(get_version(stub, v2.version)),
                       "recovery to decide the interrupted run")
    assert final.status == REJECTED and "lost the publish race" in final.decision
    assert etcd.get(MODEL_CURRENT).value == other.encode()


def test_update_interrupted_by_kill_9_resumes_without_publishing_twice(own_database, trainer_env, start_service,
                                                                       etcd):
    engine = engine_of(own_database)
    first_data(engine)
    process = start_service("services.trainer", trainer_env)
    v1 = leader_stub(process).Train(trainer_pb2.TrainRequest(publish=True), timeout=120).version
    process.stop()
    start_revision = etcd.get(MODEL_CURRENT).mod_revision + 1

    # 1. killed right after the CAS, before the version row said "published"
    more_data(engine, lsn=200, seed_value=3)
    hanging = start_service("tests.trainer_drills", {**trainer_env, "TRAINER_DRILL_HANG_AT": "published_etcd"},
                            name="trainer-hang-1")
    stub = leader_stub(hanging)
    in_background(lambda: stub.Update(trainer_pb2.UpdateRequest(publish=True), timeout=120))
    wait_until(lambda: etcd.get_json(MODEL_CURRENT)["version"] == v1.version + 1, "the publish")
    published_revision = etcd.get(MODEL_CURRENT).mod_revision
    hanging.kill()
    v2 = v1.version + 1
    with engine.connect() as connection:    # etcd says v2, the row still says candidate
        assert connection.execute(sa.text("SELECT status FROM model_versions WHERE version = :v"),
                                  {"v": v2}).scalar_one() == "candidate"

    # 2. killed in the middle of an update (its version allocated, no artifact yet)
    more_data(engine, lsn=300, seed_value=4, prefix="K")
    hanging = start_service("tests.trainer_drills", {**trainer_env, "TRAINER_DRILL_HANG_AT": "training"},
                            name="trainer-hang-2")
    stub = leader_stub(hanging)
    # the new leader first recovers version 2 (already in etcd: recorded, not re-published)
    wait_until(lambda: get_version(stub, v2).status == PUBLISHED, "recovery of version 2")
    assert etcd.get(MODEL_CURRENT).mod_revision == published_revision
    assert "recorded by recovery" in get_version(stub, v2).decision
    in_background(lambda: stub.Update(trainer_pb2.UpdateRequest(publish=True), timeout=120))
    latest = lambda: stub.Status(trainer_pb2.TrainerServiceStatusRequest(), timeout=5).latest_version  # noqa: E731
    v3 = wait_until(lambda: (lambda n: n if n > v2 else None)(latest()), "version 3 to be allocated")
    interrupted = get_version(stub, v3)
    assert interrupted.status == CANDIDATE and not interrupted.sha256
    hanging.kill()

    recovering = start_service("services.trainer", trainer_env, name="trainer-recover")
    stub = stub_of(recovering)
    resumed = wait_until(lambda: (lambda v: v if v.status != CANDIDATE else None)(get_version(stub, v3)),
                         "the interrupted update to be redone")
    assert resumed.status == PUBLISHED and resumed.parent_version == v2
    assert (resumed.lsn_from, resumed.lsn_to) == (interrupted.lsn_from, interrupted.lsn_to) == (200, 300)
    assert etcd.get_json(MODEL_CURRENT)["version"] == v3
    assert stub.Status(trainer_pb2.TrainerServiceStatusRequest(), timeout=5).latest_version == v3  # no extra version
    # every version reached model/current exactly once
    assert publishes_of(etcd, start_revision) == [v2, v3]


def test_only_the_leader_trains_and_a_standby_takes_over(own_database, trainer_env, start_service, etcd):
    engine = engine_of(own_database)
    first_data(engine)
    a = start_service("services.trainer", {**trainer_env, "TRAINER_ID": "trainer-a"}, name="trainer-a")
    leader_stub(a)
    b = start_service("services.trainer", {**trainer_env, "TRAINER_ID": "trainer-b"}, name="trainer-b")
    stub_b = stub_of(b)
    status_b = stub_b.Status(trainer_pb2.TrainerServiceStatusRequest(), timeout=5)
    assert not status_b.leader and status_b.leader_id == "trainer-a" and status_b.trainer_id == "trainer-b"
    with pytest.raises(grpc.RpcError) as error:
        stub_b.Train(trainer_pb2.TrainRequest(publish=True), timeout=30)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "trainer-a" in error.value.details()

    a.kill()                                   # the leader dies; its lease expires
    wait_until(lambda: stub_b.Status(trainer_pb2.TrainerServiceStatusRequest(), timeout=5).leader,
               "the standby to take over")
    trained = stub_b.Train(trainer_pb2.TrainRequest(publish=True), timeout=120)
    assert trained.published and etcd.get_json(MODEL_CURRENT)["version"] == trained.version.version


def test_loop_records_the_delta_stream_and_keeps_the_model_current(own_database, trainer_env, start_service,
                                                                  etcd_prefix):
    pytest.importorskip("services.collector.cdc.service")
    url, engine = own_database
    collector = start_service("services.collector", {k: v for k, v in trainer_env.items()
                                                     if not k.startswith("TRAINER_")}, name="collector")
    collector_stub = collector_pb2_grpc.CollectorServiceStub(channel_to(collector))
    collector_stub.UpsertItems(collector_pb2.UpsertItemsRequest(items=[
        common_pb2.Item(item_id=i, title=t, category=c, active=True)
        for i, t, c in datasets.structured_catalog() + datasets.structured_catalog(prefix="J")]), timeout=30)

    def send(rows) -> None:
        for start in range(0, len(rows), 200):
            events = []
            for row in rows[start:start + 200]:
                event = common_pb2.Event(event_id=row.event_id, user_id=row.user_id, item_id=row.item_id,
                                         type=getattr(common_pb2, f"EVENT_TYPE_{row.event_type.upper()}"))
                event.timestamp.FromSeconds(int(row.occurred_at))
                events.append(event)
            assert collector_stub.IngestEvents(collector_pb2.IngestEventsRequest(events=events),
                                               timeout=30).accepted == len(events)

    first = datasets.structured_interactions(n_users=80)
    send(first)
    trainer = start_service("services.trainer", {
        **trainer_env, "COLLECTOR_ADDRESS": collector.address, "TRAINER_LOOP": "1",
        "TRAINER_LOOP_INTERVAL_S": "0.5", "TRAINER_MIN_INTERACTIONS": str(len(first)),
        "TRAINER_MIN_TEXT_COVERAGE": "0",          # no features service here: the trainer embeds titles
        "TRAINER_STRATEGY_THRESHOLD": "100", "TRAINER_STRATEGY_PRIORITY": "recency",
        "TRAINER_STRATEGY_TOP_SHARE": "0.9", "TRAINER_FIRST_EPOCHS": "2", "TRAINER_SHADOW_FULL_EVERY": "1"})
    stub = stub_of(trainer)
    status = lambda: stub.Status(trainer_pb2.TrainerServiceStatusRequest(), timeout=5)  # noqa: E731

    def column(sql: str, **values):
        with engine.connect() as connection:
            return connection.execute(sa.text(sql), values).scalar()

    # a quick first model (2 epochs), then the full one (TRAINER_MODEL_EPOCHS) as the next version
    wait_until(lambda: status().current_version >= 2, "the loop's quick first model, then its full one")
    assert get_version(stub, 1).strategy == get_version(stub, 2).strategy == "full"
    assert column("SELECT parameters->>'epochs' FROM model_versions WHERE version = 1") == "2"
    assert column("SELECT parameters->>'epochs' FROM model_versions WHERE version = 2") == "15"
    first_version = 2
    assert status().current_version == first_version

    more = datasets.structured_interactions(n_users=30, start=datasets.STRUCTURED_T0 + 50_000, user_prefix="N",
                                             item_prefix="J", seed=3)
    send(more)
    newest_update = "SELECT max(version) FROM model_versions WHERE strategy <> 'full' AND status = 'published'"
    wait_until(lambda: column(newest_update), "the loop's incremental update")
    update = get_version(stub, column(newest_update))
    assert update.parent_version == first_version and update.strategy == "threshold+priority"
    assert update.parameters.priority == "recency" and update.status == PUBLISHED
    # every TRAINER_SHADOW_FULL_EVERY=1 updates, a shadow full retrain on the same data and slice,
    # recorded beside the update with its metrics and cost
    wait_until(lambda: column("SELECT full_version FROM model_versions WHERE version = :v", v=update.version),
               "the shadow full retrain of the update")
    shadow = column("SELECT full_version FROM model_versions WHERE version = :v", v=update.version)
    with engine.connect() as connection:
        row = connection.execute(sa.text(
            "SELECT u.full_metrics, u.full_train_seconds, u.metrics, s.shadow_of, s.lsn_to, u.lsn_to, s.status, "
            "s.baseline_metrics, u.gate_evidence FROM model_versions u JOIN model_versions s "
            "ON s.version = u.full_version WHERE u.version = :v"), {"v": update.version}).one()
    full_metrics, full_seconds, update_metrics, shadow_of, shadow_lsn, update_lsn, shadow_status, measured, evidence = row
    assert shadow_of == update.version and shadow_lsn == update_lsn and full_seconds > 0
    assert full_metrics["users"] == update_metrics["users"] > 0 and evidence == "sufficient"
    assert measured["ndcg_at_10"] == pytest.approx(update_metrics["ndcg_at_10"])   # the update, on the same slice
    assert shadow_status in ("candidate", "published") and shadow > update.version

    def recorded() -> int:
        with engine.connect() as connection:
            return connection.execute(sa.text("SELECT count(*) FROM trainer_interactions")).scalar_one()
    wait_until(lambda: recorded() == len(first) + len(more), "every event to be recorded")
    with engine.connect() as connection:
        applied = connection.execute(sa.text(
            "SELECT applied_lsn FROM consumer_offsets WHERE consumer = 'trainer'")).scalar_one()
    assert applied >= update.lsn_to > 0
