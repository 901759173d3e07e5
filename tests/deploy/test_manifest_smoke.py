"""Manifest smoke test: every DeltaRec Deployment/StatefulSet of deploy/k8s starts as written.

For each workload whose container runs `python -m services.<name>`, the container's command is
started on this machine with its environment as the kubelet would build it from the rendered
dev overlay: envFrom ConfigMaps and Secrets resolved, `env` expanded, the downward API answered,
Secret volumes written to files at a local stand-in of their mount path. Only what names the
cluster is mapped onto the local suite:
  - in-cluster `service:port` names (e.g. `dns:///collector:8080`, `etcd-client:2379`) become the
    local addresses of the processes and of the test Postgres / etcd (scheme kept: dns:/// stays);
  - the declared ports (GRPC_PORT 8080 / METRICS_PORT 9090, the same in every pod) become free
    local ports, BIND_HOST 0.0.0.0 becomes 127.0.0.1, the pod IP 127.0.0.1;
  - the Secret's database URL keeps its driver and gets the test database's host, port, name and
    credentials; ETCD_PREFIX gets a prefix of its own; emptyDir mounts are temporary folders.
Then each process must answer the gRPC health check with SERVING on the port standing for the
one its probes name, serve Prometheus metrics on its metrics port, and leave by itself on
SIGTERM within terminationGracePeriodSeconds. A module that does not exist, a variable a
service does not accept, or a port the service does not take from its environment fails here.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from services.status.collect import check_health
from tests.deploy.manifests import (REPO_ROOT, container_environment, mount_secret_volumes, render,
                                    rewrite_paths, service_workloads)
from tests.support import wait_until

pytestmark = pytest.mark.timeout(1200)

# Variables a container may carry that no services/*/config.py reads, and why.
RUNTIME_VARIABLES = {
    "POD_NAME", "POD_IP",                 # downward API, referenced by other variables
    "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE",   # the interpreter and libraries
    "GRPC_DNS_RESOLVER",                  # gRPC core
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config_variables(module: str) -> set[str]:
    """Every variable the service's config dataclass reads (services/<name>/config.py)."""
    import dataclasses
    import importlib

    from services.common.config import CommonConfig, describe
    config_module = importlib.import_module(module + ".config")
    classes = [value for value in vars(config_module).values() if isinstance(value, type)
               and dataclasses.is_dataclass(value) and issubclass(value, CommonConfig)]
    assert classes, f"{module}.config has no config dataclass"
    return {row[0] for cls in classes for row in describe(cls)}


def _order(workloads, references) -> list:
    """Dependencies first: a workload whose environment names another's Service starts after it."""
    ordered, placed = [], set()
    while len(ordered) < len(workloads):
        ready = [w for w in workloads if w.name not in placed and references[w.name] <= placed]
        assert ready, f"circular references between {[w.name for w in workloads if w.name not in placed]}"
        for workload in ready:
            ordered.append(workload)
            placed.add(workload.name)
    return ordered


def test_every_service_workload_starts_as_its_manifest_says(infra_env, database_url, tmp_path):
    objects = render("dev")
    workloads = service_workloads(objects)
    base_names = {w.name for w in service_workloads(render("base"))}
    assert {w.name for w in workloads} == base_names == {"collector", "features", "trainer", "ranker", "consistency"}

    # Every shared setting is read by some service (a misspelt key would silently do nothing).
    read_by_any = set().union(*(_config_variables(w.module) for w in workloads)) | RUNTIME_VARIABLES
    shared = {key for obj in objects if obj["kind"] == "ConfigMap" for key in obj.get("data", {})}
    assert not shared - read_by_any, f"ConfigMap keys no service reads: {sorted(shared - read_by_any)}"

    services = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Service"}
    local_db = sa.engine.make_url(database_url)
    ports = {w.name: (_free_port(), _free_port()) for w in workloads}
    # in-cluster "name:port" -> local address
    local = {f"{w.name}:{w.grpc_port}": f"127.0.0.1:{ports[w.name][0]}" for w in workloads}
    local["postgres:5432"] = f"{local_db.host}:{local_db.port}"
    local["etcd-client:2379"] = infra_env.etcd_endpoint
    in_cluster = re.compile(r"(?<![\w.\-])(" + "|".join(sorted(map(re.escape, services), key=len, reverse=True))
                            + r"):(\d+)")
    prefix = f"/smoke-{uuid.uuid4().hex[:8]}/"

    environments, references = {}, {}
    for workload in workloads:
        field_values = {"metadata.name": f"{workload.name}-smoke-0", "metadata.namespace": "deltarec",
                        "status.podIP": "127.0.0.1"}
        env = container_environment(workload, objects, field_values)
        allowed = _config_variables(workload.module) | RUNTIME_VARIABLES
        explicit = {entry["name"] for entry in workload.container.get("env", [])}
        unread = sorted(name.removesuffix("_FILE") for name in explicit
                        if name.removesuffix("_FILE") not in allowed)
        assert not unread, f"{workload.name} sets variables its service does not read: {unread}"
        assert env["GRPC_PORT"] == str(workload.grpc_port) and env["METRICS_PORT"] == str(workload.metrics_port)

        root = tmp_path / workload.name
        mounted = mount_secret_volumes(workload, objects, root / "secrets")
        for mount in workload.container.get("volumeMounts", []):
            if mount["mountPath"] not in mounted:          # emptyDir
                mounted[mount["mountPath"]] = root / mount["name"]
                mounted[mount["mountPath"]].mkdir(parents=True, exist_ok=True)
        # The database URL of the Secret, pointed at the test database.
        url_file = Path(rewrite_paths({"f": env["DATABASE_URL_FILE"]}, mounted)["f"])
        secret_url = sa.engine.make_url(url_file.read_text().strip())
        assert secret_url.drivername == local_db.drivername
        url_file.write_text(secret_url.set(host=local_db.host, port=local_db.port, username=local_db.username,
                                           password=local_db.password, database=local_db.database)
                            .render_as_string(hide_password=False))

        # Dependencies: the Services named by variables this service reads (the ConfigMap gives
        # every pod every address).
        references[workload.name] = {match.group(1) for name, value in env.items() if name.removesuffix("_FILE") in allowed
                                     for match in in_cluster.finditer(value)
                                     if match.group(1) in base_names and match.group(1) != workload.name}
        mapped = {}
        for name, value in rewrite_paths(env, mounted).items():
            value = in_cluster.sub(lambda m: local.get(m.group(0), m.group(0)), value)
            left = [m.group(0) for m in in_cluster.finditer(value)]
            assert not left, f"{workload.name} {name}={value}: {left} has no local stand-in"
            mapped[name] = value
        mapped.update(GRPC_PORT=str(ports[workload.name][0]), METRICS_PORT=str(ports[workload.name][1]),
                      BIND_HOST="127.0.0.1", ETCD_PREFIX=prefix)
        environments[workload.name] = mapped

    processes: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    try:
        for workload in _order(workloads, references):
            command = workload.container["command"]
            assert command[0] == "python"
            # The image's ENV: PYTHONPATH=/app:/app/gen with WORKDIR /app (deploy/Dockerfile).
            env = {"PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'gen'}", **environments[workload.name]}
            logs[workload.name] = tmp_path / f"{workload.name}.log"
            with open(logs[workload.name], "wb") as log:
                processes[workload.name] = subprocess.Popen([sys.executable, *command[1:]], cwd=REPO_ROOT, env=env,
                                                            stdout=log, stderr=subprocess.STDOUT,
                                                            stdin=subprocess.DEVNULL)
            address = f"127.0.0.1:{ports[workload.name][0]}"

            def serving(name=workload.name, address=address) -> bool:
                if processes[name].poll() is not None:
                    raise AssertionError(f"{name} exited with {processes[name].returncode}:\n"
                                         + logs[name].read_text(errors="replace")[-3000:])
                return check_health(address) == "SERVING"
            # A hang guard, not a timing assertion: a loaded machine is slower than any startupProbe.
            wait_until(serving, f"{workload.name} SERVING on its gRPC port", timeout_s=600, interval_s=0.5)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports[workload.name][1]}/metrics", timeout=10).read()
            assert b"deltarec_" in metrics or b"python_info" in metrics, workload.name

        # The status command sees the same suite (the test of services.status against live parts).
        addresses = {name: f"127.0.0.1:{ports[name][0]}" for name in ports}
        wait_until(lambda: _status(addresses, prefix, infra_env.etcd_endpoint)["rankers"], "ranker registered", 60)
        snapshot = _status(addresses, prefix, infra_env.etcd_endpoint)
        assert {h["service"] for h in snapshot["health"]} == set(ports)
        assert all(h["status"] == "SERVING" for h in snapshot["health"]), snapshot["health"]
        assert snapshot["rankers"][0]["source"] == "Status"
        assert snapshot["rankers"][0]["replica_id"] == "ranker-smoke-0"   # RANKER_REPLICA_ID=$(POD_NAME)
        assert snapshot["rankers"][0]["address"] == addresses["ranker"]   # ADVERTISE_HOST=$(POD_IP)
        assert snapshot["features"] is not None and snapshot["trainer"] is not None
        assert not snapshot["errors"], snapshot["errors"]
    finally:
        stop_like_the_kubelet(processes, workloads)
    assert_stopped_cleanly(processes, workloads, logs)


def stop_like_the_kubelet(processes: dict, workloads) -> None:
    """SIGTERM to every started workload (the last started first), then the kubelet's SIGKILL
    after terminationGracePeriodSeconds, which fails the test."""
    for name in reversed(list(processes)):
        processes[name].send_signal(signal.SIGTERM)
    for workload in workloads:
        process = processes.get(workload.name)
        if process is None:
            continue
        try:
            process.wait(workload.pod_spec["terminationGracePeriodSeconds"])
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"{workload.name} did not stop within terminationGracePeriodSeconds")


def assert_stopped_cleanly(processes: dict, workloads, logs: dict) -> None:
    for workload in workloads:
        assert processes[workload.name].returncode == 0, \
            f"{workload.name}: exit {processes[workload.name].returncode}\n" \
            + logs[workload.name].read_text(errors="replace")[-2000:]


def _status(addresses: dict[str, str], prefix: str, etcd: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "services.status", "--json", "--etcd", etcd, "--etcd-prefix", prefix,
         *[arg for name in ("collector", "features", "trainer", "consistency") for arg in (f"--{name}", addresses[name])]],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
