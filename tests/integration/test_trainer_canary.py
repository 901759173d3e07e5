"""The trainer's publish-as-canary setting (TRAINER_PUBLISH_AS=canary) against real Postgres,
etcd and gRPC: the first version goes to model/current, the next gated one to model/canary with
the configured share; an undecided canary is never replaced (the next candidate is kept, not
published); the decider's promote and abort are recorded on the version by the trainer's loop
(published / rejected), and the version message carries the lineage."""
from __future__ import annotations

import pytest

from deltarec.v1 import trainer_pb2
from services.contracts.etcd_keys import MODEL_CANARY, MODEL_CURRENT
from services.contracts.model_pointer import ModelPointer
from services.feedback.decider import CanaryDecider, read_pointers
from services.feedback.policy import ABORT, PROMOTE, Decision
from tests.integration.test_trainer_service import (  # noqa: F401 - fixtures
    CANDIDATE, PUBLISHED, REJECTED, cli, engine_of, etcd, first_data, get_version, leader_stub, more_data,
    own_database, trainer_env)
from tests.support import wait_until

pytestmark = pytest.mark.integration


def decide(etcd, engine, action: str) -> None:
    decider = CanaryDecider(etcd, engine, "test-decider", ttl_s=5)
    try:
        assert decider.apply(Decision(action, f"test {action}", {"metric": "ctr"}), read_pointers(etcd))
    finally:
        decider.leadership.resign()


def status_of(stub):
    return stub.Status(trainer_pb2.TrainerServiceStatusRequest(), timeout=5)


def test_publish_as_canary_keeps_an_undecided_canary_and_records_its_decision(own_database, trainer_env,
                                                                               start_service, etcd):
    engine = engine_of(own_database)
    first_data(engine)
    env = {**trainer_env, "TRAINER_PUBLISH_AS": "canary", "TRAINER_CANARY_SHARE": "0.25",
           "TRAINER_LOOP_INTERVAL_S": "0.3"}
    process = start_service("services.trainer", env)
    stub = leader_stub(process)

    # No model/current yet: there is nothing to compare a canary with, the first goes to current.
    first = stub.Train(trainer_pb2.TrainRequest(seed=5, publish=True), timeout=120)
    v1 = first.version
    assert first.published and v1.status == PUBLISHED and v1.published_as == "current"
    assert v1.gate_evidence == "no_baseline" and etcd.get(MODEL_CANARY) is None

    more_data(engine, lsn=200)
    second = stub.Update(trainer_pb2.UpdateRequest(publish=True), timeout=120)
    v2 = second.version
    assert second.published and v2.published_as == "canary" and v2.canary_share == pytest.approx(0.25)
    assert v2.status == CANDIDATE and "awaiting the canary decision" in v2.decision
    assert v2.parent_version == v2.baseline_version == v1.version and v2.gate_evidence
    canary = ModelPointer.from_json(etcd.get(MODEL_CANARY).value, canary=True)
    assert (canary.version, canary.sha256, canary.uri, canary.share, canary.data_lsn) == \
        (v2.version, v2.sha256, v2.artifact_uri, 0.25, 200)
    assert etcd.get_json(MODEL_CURRENT)["version"] == v1.version
    status = status_of(stub)
    assert status.canary_version == v2.version and status.current_version == v1.version

    # A canary in flight is not replaced: the next gated candidate is kept, not published.
    canary_raw = etcd.get(MODEL_CANARY).value
    more_data(engine, lsn=300, seed_value=4, prefix="K")
    third = stub.Update(trainer_pb2.UpdateRequest(publish=True), timeout=120)
    v3 = third.version
    assert not third.published and v3.status == CANDIDATE and v3.published_as == ""
    assert f"canary version {v2.version}" in v3.decision and "undecided" in v3.decision and v3.sha256
    assert etcd.get(MODEL_CANARY).value == canary_raw

    # The decider promotes: the trainer's loop records v2 published (it is model/current now).
    decide(etcd, engine, PROMOTE)
    promoted = wait_until(lambda: (lambda v: v if v.status != CANDIDATE else None)(get_version(stub, v2.version)),
                          "the trainer to record the promotion")
    assert promoted.status == PUBLISHED and promoted.canary_decision == "promote" and "promoted" in promoted.decision
    assert etcd.get_json(MODEL_CURRENT)["version"] == v2.version and etcd.get(MODEL_CANARY) is None
    assert status_of(stub).canary_version == 0

    # The next update warm-starts from the promoted version and is the next canary; the decider aborts it.
    fourth = stub.Update(trainer_pb2.UpdateRequest(publish=True), timeout=120)
    v4 = fourth.version
    assert fourth.published and v4.published_as == "canary" and v4.parent_version == v2.version
    decide(etcd, engine, ABORT)
    aborted = wait_until(lambda: (lambda v: v if v.status != CANDIDATE else None)(get_version(stub, v4.version)),
                         "the trainer to record the abort")
    assert aborted.status == REJECTED and aborted.canary_decision == "abort" and "aborted" in aborted.decision
    assert etcd.get_json(MODEL_CURRENT)["version"] == v2.version
    listed = stub.ListVersions(trainer_pb2.ListVersionsRequest(), timeout=10)
    assert [(v.version, v.published_as) for v in listed.versions] == \
        [(v4.version, "canary"), (v3.version, ""), (v2.version, "canary"), (v1.version, "current")]
    listing = cli("--address", process.address, "versions")
    assert f"v{v4.version:<5} rejected*" in listing and f"v{v2.version:<5} published*" in listing


def test_a_canary_share_outside_zero_and_one_is_refused_at_start(trainer_env):
    import subprocess
    import sys

    from tests.support import REPO_ROOT
    for share in ("0", "1"):
        result = subprocess.run([sys.executable, "-m", "services.trainer"], capture_output=True, text=True,
                                timeout=60, cwd=REPO_ROOT,
                                env={**trainer_env, "PATH": "/usr/bin:/bin",
                                     "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'gen'}",
                                     "TRAINER_PUBLISH_AS": "canary", "TRAINER_CANARY_SHARE": share})
        assert result.returncode == 2 and f"TRAINER_CANARY_SHARE={float(share)!r}: must be > 0 and < 1" \
            in result.stderr, result.stderr
