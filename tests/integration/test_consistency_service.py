"""The consistency service as an operable process: reflection, health, metrics, configuration
errors, the periodic check, graceful shutdown. Postgres and etcd only (no other service)."""
from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest

from deltarec.v1 import consistency_pb2, consistency_pb2_grpc
from scripts.launch import REPO_ROOT
from tests.integration.test_service_plumbing import grpcurl, metric_samples
from tests.support import channel_to, wait_until

pytestmark = pytest.mark.integration

SERVICE = "deltarec.v1.ConsistencyService"


def test_reflection_health_metrics_and_the_periodic_check(start_service, service_env, tmp_path):
    process = start_service("services.consistency", {**service_env, "CONSISTENCY_CHECK_INTERVAL_S": "0.5"})
    stub = consistency_pb2_grpc.ConsistencyServiceStub(channel_to(process))
    assert SERVICE in grpcurl(process.address, "list", cwd=tmp_path).split()
    methods = set(grpcurl(process.address, "list", SERVICE, cwd=tmp_path).split())
    assert {f"{SERVICE}.{m}" for m in ("Check", "Reconcile", "Rollback", "History")} <= methods
    assert "drop_slots" in grpcurl(process.address, "describe", "deltarec.v1.ReconcileRequest", cwd=tmp_path)
    health = json.loads(grpcurl(process.address, "grpc.health.v1.Health/Check",
                                data=json.dumps({"service": SERVICE})))
    assert health["status"] == "SERVING"
    report = json.loads(grpcurl(process.address, f"{SERVICE}/Check", data="{}", cwd=tmp_path))
    assert report["consistent"] is True                  # an empty suite agrees with itself
    # The background loop checks by itself and records each check.
    checks = consistency_pb2.HistoryRequest(kind="check")
    wait_until(lambda: len(stub.History(checks, timeout=10).entries) >= 3, "the periodic check to run")
    samples = metric_samples(process)
    assert samples[("deltarec_consistency_last_consistent_timestamp_seconds", ())] > 0
    labels = (("check", "catalog_features"), ("severity", "error"))
    assert ("deltarec_consistency_findings", labels) in samples
    with pytest.raises(grpc.RpcError) as error:
        stub.Check(consistency_pb2.CheckRequest(checks=["everything"]), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "checks" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        stub.Reconcile(consistency_pb2.ReconcileRequest(drop_slots=[""]), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "drop_slots[0]" in error.value.details()
    process.stop(timeout_s=20)
    assert process.process.returncode == 0


def test_a_bad_setting_stops_the_start_with_one_line(service_env):
    result = subprocess.run([sys.executable, "-m", "services.consistency"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={**service_env, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'gen'}",
                                 "CONSISTENCY_VERSION_GRACE_S": "-1"})
    assert result.returncode == 2
    assert "CONSISTENCY_VERSION_GRACE_S" in result.stderr and len(result.stderr.strip().splitlines()) == 1
