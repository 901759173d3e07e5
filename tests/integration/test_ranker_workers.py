"""RANKER_WORKERS=2 end to end: a supervisor and its two worker processes on one SO_REUSEPORT port,
real etcd, a real model artifact published as the trainer does. The features side is the stand-in
process of tests/fakes.py (a real gRPC server with WatchItems / WatchUsers / GetUserFeatures over a
small synthetic catalog): what is tested here is the process shape, and the full
collector -> features -> ranker path is tests/integration/test_ranker.py's. Nothing asserts on
timings; the waits only guard against a hang."""
from __future__ import annotations

import json
import os
import signal
import uuid

import grpc
import pytest

from deltarec.v1 import ranker_pb2, ranker_pb2_grpc
from scripts.launch import ServiceProcess
from services.common import channels
from services.common.artifacts import ArtifactStore
from services.common.etcd import Etcd
from tests import fakes
from tests.support import wait_until

pytestmark = pytest.mark.integration

CATALOG = "synthetic:300"


def workers_of(supervisor_pid: int) -> dict[int, int]:
    """worker index -> pid of the supervisor's children (their RANKER_WORKER_INDEX)."""
    found = {}
    with open(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children") as children:
        for pid in map(int, children.read().split()):
            try:
                with open(f"/proc/{pid}/environ", "rb") as environ:
                    env = dict(e.split(b"=", 1) for e in environ.read().split(b"\0") if b"=" in e)
            except OSError:
                continue
            if b"RANKER_WORKER_INDEX" in env:
                found[int(env[b"RANKER_WORKER_INDEX"])] = pid
    return found


def status_at(address: str):
    with grpc.insecure_channel(address) as channel:
        return ranker_pb2_grpc.RankerServiceStub(channel).Status(ranker_pb2.RankerServiceStatusRequest(), timeout=10)


def registered(etcd, replica_id: str) -> dict | None:
    kv = etcd.get(f"rankers/{replica_id}")
    value = json.loads(kv.value) if kv is not None else None
    return value if value and value.get("model_version") == 1 else None


def test_two_workers_register_answer_and_a_killed_one_comes_back(infra_env, database_url, tmp_path):
    prefix = f"/test-{uuid.uuid4().hex[:10]}/"
    etcd = Etcd(infra_env.etcd_endpoint, prefix)
    dataset, vectors = fakes.stand_in_catalog(CATALOG)
    item_ids = [item.item_id for item in dataset.items]
    store = ArtifactStore((tmp_path / "artifacts").as_uri())
    fakes.publish(etcd, fakes.store_artifact(store, fakes.make_artifact(1, item_ids, vectors, dim=32)))
    processes = []
    try:
        stand_in = ServiceProcess("tests.fakes", {"STAND_IN_CATALOG": CATALOG}, name="stand-in",
                                  log_dir=tmp_path / "logs").start(timeout_s=120)
        processes.append(stand_in)
        ranker = ServiceProcess("services.ranker", {
            "DATABASE_URL": database_url, "ETCD_ENDPOINT": infra_env.etcd_endpoint, "ETCD_PREFIX": prefix,
            "GRPC_PORT": "0", "METRICS_PORT": "0", "LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_S": "1",
            "FEATURES_ADDRESS": stand_in.address, "RANKER_REPLICA_ID": "rk", "RANKER_WORKERS": "2",
            "RANKER_ATTRIBUTION": "false", "RANKER_REGISTER_INTERVAL_S": "0.5", "RANKER_LEASE_TTL_S": "3"},
            name="ranker", log_dir=tmp_path / "logs").start(timeout_s=240)
        processes.append(ranker)

        # Both workers register, each under its own id and at its own address (not the shared port).
        values = {w: wait_until(lambda w=w: registered(etcd, f"rk-w{w}"), f"rk-w{w} registered") for w in (0, 1)}
        addresses = {w: value["address"] for w, value in values.items()}
        assert len(set(addresses.values())) == 2 and ranker.address.split(":")[-1] not in \
            [a.rsplit(":", 1)[-1] for a in addresses.values()]
        for w, address in addresses.items():
            assert status_at(f"127.0.0.1:{address.rsplit(':', 1)[-1]}").replica_id == f"rk-w{w}"
        assert values[0]["index_checksum"] == values[1]["index_checksum"]

        # The shared port: a client's connections land on both workers (32 connections all on
        # one would be a chance of 2^-31), and each answers a Recommend. The launcher read the
        # worker count from the ready line; a pooled channel opens that many connections or more.
        assert ranker.workers == 2
        seen = set()
        with channels.make_channel(ranker.address, channels.RANKER, security=None, connections=32) as channel:
            stub = ranker_pb2_grpc.RankerServiceStub(channel)
            user = next(iter(dataset.sequences))
            for _ in range(64):
                seen.add(stub.Status(ranker_pb2.RankerServiceStatusRequest(), timeout=10).replica_id)
                answer = stub.Recommend(ranker_pb2.RecommendRequest(user_id=user, k=5), timeout=10)
                assert len(answer.items) == 5 and answer.freshness.model_version == 1
        assert seen == {"rk-w0", "rk-w1"}

        # kill -9 one worker: the supervisor starts it again, and it registers again.
        pids = wait_until(lambda: (lambda found: found if len(found) == 2 else None)(workers_of(ranker.process.pid)),
                          "two workers")
        os.kill(pids[0], signal.SIGKILL)
        restarted = wait_until(lambda: (lambda found: found.get(0) not in (None, pids[0]) and found)(
            workers_of(ranker.process.pid)), "worker 0 restarted")
        assert restarted[1] == pids[1]
        back = wait_until(lambda: (lambda v: v if v and v["address"] != addresses[0] else None)(
            registered(etcd, "rk-w0")), "rk-w0 registered again")
        assert status_at(f"127.0.0.1:{back['address'].rsplit(':', 1)[-1]}").replica_id == "rk-w0"
        assert ranker.alive()
        assert '"worker exited: restarting it"' in ranker.log_path.read_text()

        # SIGTERM to the supervisor stops both workers gracefully; it exits 0.
        assert ranker.stop(timeout_s=60) == 0
        for pid in restarted.values():
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        wait_until(lambda: etcd.get("rankers/rk-w0") is None and etcd.get("rankers/rk-w1") is None,
                   "the registrations to go with the workers", timeout_s=30)
    finally:
        for process in reversed(processes):
            process.stop(timeout_s=30)
        etcd.close()
