"""The fault suite (short drills; bench/faults.py runs the long version): the real collector,
features, trainer and ranker processes on a Postgres and an etcd of this module alone, under a
steady stream of events, through kill -9 and SIGSTOP of each service, a Postgres stop and
restart, and an etcd stop and restart. At the end every acknowledged event is stored once,
reflected once in features and recorded once by the trainer; every service came back to
SERVING by itself; no service logged an ERROR.

The drills run in file order on one stack and one stream; the accounting is the last test.
Waiting is by polling with generous deadlines that only guard against a hang.
"""
from __future__ import annotations

import time
import uuid

import pytest
from grpc_health.v1 import health_pb2

from deltarec.v1 import ranker_pb2, ranker_pb2_grpc
from scripts.drills import SERVICES, DrillStack, EventStream, account
from tests.conftest import REPO_ROOT
from tests.support import wait_until

pytestmark = pytest.mark.integration

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PAUSE_S = 4.0        # longer than the peers' deadlines (ingest 2 s, ranker -> features 0.5 s)
RECOVERY: dict[str, float] = {}


@pytest.fixture(scope="module")
def drill(tmp_path_factory):
    state = REPO_ROOT / ".run" / f"test-faults-{uuid.uuid4().hex[:8]}"
    stack = DrillStack(state, items=80, log_dir=tmp_path_factory.mktemp("logs"))
    try:
        stack.start()
        stack.wait_serving()
        stream = EventStream(stack.address("collector"), stack.items, rate=40, batch=8, users=30).start()
        wait_until(lambda: len(stream.ledger.acknowledged) >= 80, "the stream to flow")
        yield stack, stream
    finally:
        stack.close()
        import shutil
        shutil.rmtree(state, ignore_errors=True)


def flowing(stream: EventStream, more: int = 40) -> None:
    """The stream is acknowledged again (after a fault)."""
    start = len(stream.ledger.acknowledged)
    wait_until(lambda: len(stream.ledger.acknowledged) >= start + more, "events to be acknowledged again")


@pytest.mark.parametrize("name", SERVICES)
def test_kill_9_and_restart(drill, name):
    stack, stream = drill
    stack.kill(name)
    ended = time.monotonic()
    stack.start_service(name)
    stack.wait_serving()
    RECOVERY[f"kill_{name}"] = time.monotonic() - ended
    flowing(stream)


@pytest.mark.parametrize("name", SERVICES)
def test_sigstop_longer_than_the_peers_deadlines(drill, name):
    stack, stream = drill
    ranker = ranker_pb2_grpc.RankerServiceStub(stack.channel("ranker"))
    user = stream.users[0]
    if name == "features":
        ranker.Recommend(ranker_pb2.RecommendRequest(user_id=user, k=5), timeout=10)   # cached
    stack.pause(name)
    try:
        if name == "features":
            # A hung features service: once the user's fresh cache entry expired, the ranker
            # answers from its stale copy within its deadline, and says degraded.
            answer = wait_until(lambda: (lambda a: a if a.degraded else None)(ranker.Recommend(
                ranker_pb2.RecommendRequest(user_id=user, k=5), timeout=10)), "a degraded Recommend answer")
            assert answer.items
        time.sleep(PAUSE_S)
    finally:
        stack.resume(name)
    ended = time.monotonic()
    stack.wait_serving()
    RECOVERY[f"sigstop_{name}"] = time.monotonic() - ended
    flowing(stream)


def test_postgres_stop_turns_consumers_not_serving_then_everything_recovers(drill):
    stack, stream = drill
    stack.stop_postgres()
    try:
        # The defect this guards: features said SERVING while its consumer had stopped for good.
        wait_until(lambda: stack.health("features") == NOT_SERVING, "features to report NOT_SERVING")
        wait_until(lambda: stack.health("collector") == NOT_SERVING, "the collector to report NOT_SERVING")
    finally:
        stack.start_postgres()
    ended = time.monotonic()
    stack.wait_serving()
    RECOVERY["postgres_restart"] = time.monotonic() - ended
    flowing(stream)
    wait_until(lambda: stack.features_status().connected, "features' delta stream to be connected")


def test_etcd_stop_and_restart(drill):
    stack, stream = drill
    ranker = ranker_pb2_grpc.RankerServiceStub(stack.channel("ranker"))
    stack.stop_etcd()
    try:
        time.sleep(PAUSE_S)
        # Rankers keep serving and ingest keeps working without etcd.
        assert ranker.Recommend(ranker_pb2.RecommendRequest(user_id=stream.users[1], k=5), timeout=10).items
        flowing(stream, more=16)
    finally:
        stack.start_etcd()
    ended = time.monotonic()
    stack.wait_serving()
    RECOVERY["etcd_restart"] = time.monotonic() - ended
    flowing(stream)


def test_nothing_acknowledged_was_lost_or_doubled_anywhere(drill):
    stack, stream = drill
    ledger = stream.stop()
    assert ledger.unresolved == 0
    stack.wait_caught_up()
    counts = account(stack, stream)
    print("fault suite:", counts, "recovery_s:", {k: round(v, 1) for k, v in RECOVERY.items()})
    assert counts["acknowledged"] > 0
    assert counts["lost"] == 0, counts
    assert counts["doubled"] == 0, counts
    assert counts["stored"] == counts["reflected_in_features"] == counts["recorded_by_trainer"], counts
    # Every fault ended in SERVING again by itself (wait_serving above), and no service took a
    # client's failure or an outage for a server error.
    errors = stack.log_errors()
    assert not any(errors.values()), {name: lines[:3] for name, lines in errors.items() if lines}
