"""The prod overlay's security, started for real: every DeltaRec Deployment of the rendered prod
overlay runs its command with the environment the kubelet would build (ConfigMap incl.
security.env, `env`, downward API) and its Secret volumes written as files in the Secrets' real
layout — certificates made at run time by a cluster CA standing for cert-manager's (each with its
SPIFFE identity, its Service name and TLS_SERVER_NAME), the tokens files, and the client
certificate of an etcd started by scripts/infra.py with TLS, client-certificate auth and etcd auth
(the certificate's CN is the etcd user, as security.env says) standing for the managed etcd.
Only what names the cluster is mapped onto loopback, as in test_manifest_smoke.py.

Then each process must answer SERVING to a plaintext health check on its HEALTH_PORT (what
kubelet's gRPC probe does), refuse a plaintext client on its gRPC port, serve its metrics only over
HTTPS and only with the scrape token, and stop by itself within terminationGracePeriodSeconds; the
features service must have consumed the delta stream over mutual TLS and the ranker registered in
the TLS etcd.
"""
from __future__ import annotations

import http.client
import os
import re
import ssl
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deltarec.v1 import collector_pb2, collector_pb2_grpc
from scripts import infra
from scripts.pki import CertificateAuthority
from services.common import channels
from services.common.config import EtcdConfig, SecurityConfig, load
from services.common.etcd import Etcd
from services.contracts.etcd_keys import RANKERS_PREFIX
from tests.deploy.manifests import REPO_ROOT, container_environment, render, service_workloads
from tests.deploy.test_manifest_smoke import (_config_variables, _free_port, _order, assert_stopped_cleanly,
                                             stop_like_the_kubelet)
from tests.support import wait_until

pytestmark = pytest.mark.timeout(1500)

SCRAPE_TOKEN = "prometheus-scrape-token-0123456789"


def _health(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def _scrape(port: int, ca_file: Path | None, token: str | None) -> int:
    """The HTTP status of GET /metrics (https when `ca_file`), or -1 if the connection failed."""
    if ca_file is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        context = ssl.create_default_context(cafile=str(ca_file))
        context.check_hostname = False     # Prometheus checks server_name = TLS_SERVER_NAME; the CA is what we test
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return -1
    finally:
        connection.close()


@pytest.fixture(scope="module")
def managed_etcd(tmp_path_factory):
    """Stands for the managed etcd: TLS, client certificates required, etcd auth on."""
    state = tmp_path_factory.mktemp("managed-etcd")
    port = infra.start_etcd(state, tls=True, auth=True)
    yield state, f"127.0.0.1:{port}", infra.etcd_access(state)
    infra.stop_etcd(state)


def test_every_prod_workload_starts_with_mtls_roles_etcd_tls_and_https_metrics(
        infra_env, database_url, managed_etcd, tmp_path):
    etcd_state, etcd_endpoint, etcd_access = managed_etcd
    objects = render("prod")
    workloads = service_workloads(objects)
    assert {w.name for w in workloads} == {"collector", "features", "trainer", "ranker", "consistency"}
    services = {obj["metadata"]["name"] for obj in objects if obj["kind"] == "Service"}
    local_db = sa.engine.make_url(database_url)

    cluster_ca = CertificateAuthority("cluster-ca")
    etcd_ca = CertificateAuthority.load(Path(etcd_access.ca_file), etcd_state / "etcd-pki" / "ca.key")
    # The etcd client certificate whose CN is the etcd user (no password in prod).
    etcd_client = etcd_ca.issue(infra.ETCD_USER, dns=(), ips=())
    secrets = {
        "deltarec-db": {"DATABASE_URL": local_db.render_as_string(hide_password=False).encode()},
        "deltarec-auth": {"tokens": b"storefront:web:storefront-token-0123456789\noperator:oncall:operator-token-0123456789\n"},
        "deltarec-metrics-scrape": {"token": SCRAPE_TOKEN.encode() + b"\n"},
        "deltarec-etcd-client": {"ca.crt": etcd_ca.pem, "tls.crt": etcd_client.cert_pem, "tls.key": etcd_client.key_pem},
    }
    ports = {w.name: {"grpc": _free_port(), "metrics": _free_port(), "health": _free_port()} for w in workloads}
    local = {f"{w.name}:{w.grpc_port}": f"127.0.0.1:{ports[w.name]['grpc']}" for w in workloads}
    in_cluster = re.compile(r"(?<![\w.\-])(" + "|".join(sorted(map(re.escape, services), key=len, reverse=True))
                            + r"):(\d+)")
    prefix = f"/smoke-prod-{uuid.uuid4().hex[:8]}/"

    environments, references = {}, {}
    for workload in workloads:
        env = container_environment(workload, objects, {"metadata.name": f"{workload.name}-prod-0",
                                                        "metadata.namespace": "deltarec", "status.podIP": "127.0.0.1"})
        server_name = env["TLS_SERVER_NAME"]
        leaf = cluster_ca.issue(workload.name, dns=(workload.name, server_name, "localhost"),
                                uris=(f"spiffe://deltarec/{workload.name}",))
        secrets[f"deltarec-tls-{workload.name}"] = {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem,
                                                    "ca.crt": cluster_ca.pem}
        # Secret volumes as the kubelet writes them; emptyDirs as temporary folders.
        root, mounted = tmp_path / workload.name, {}
        volumes = {v["name"]: v for v in workload.pod_spec["volumes"]}
        for mount in workload.container["volumeMounts"]:
            directory = root / mount["name"]
            directory.mkdir(parents=True, exist_ok=True)
            secret = volumes[mount["name"]].get("secret")
            if secret is not None:
                for item in secret["items"]:
                    (directory / item["path"]).write_bytes(secrets[secret["secretName"]][item["key"]])
            mounted[mount["mountPath"].rstrip("/")] = directory
        # Dependencies: the Services named by variables this service reads (the ConfigMap gives
        # every pod every address).
        allowed = _config_variables(workload.module)
        references[workload.name] = {m.group(1) for name, value in env.items() if name.removesuffix("_FILE") in allowed
                                     for m in in_cluster.finditer(value)
                                     if m.group(1) in ports and m.group(1) != workload.name}
        mapped = {}
        for name, value in env.items():
            for mount_path, directory in mounted.items():
                if value == mount_path or value.startswith(mount_path + "/"):
                    value = str(directory) + value[len(mount_path):]
                    break
            value = in_cluster.sub(lambda m: local.get(m.group(0), m.group(0)), value)
            mapped[name] = value
        mapped.update(GRPC_PORT=str(ports[workload.name]["grpc"]), METRICS_PORT=str(ports[workload.name]["metrics"]),
                      HEALTH_PORT=str(ports[workload.name]["health"]), BIND_HOST="127.0.0.1",
                      ETCD_ENDPOINT=etcd_endpoint, ETCD_PREFIX=prefix)
        environments[workload.name] = mapped

    processes: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    try:
        for workload in _order(workloads, references):
            name, command = workload.name, workload.container["command"]
            env = {"PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'gen'}", **environments[name]}
            logs[name] = tmp_path / f"{name}.log"
            with open(logs[name], "wb") as log:
                processes[name] = subprocess.Popen([sys.executable, *command[1:]], cwd=REPO_ROOT, env=env,
                                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

            def serving(name=name) -> bool:
                if processes[name].poll() is not None:
                    raise AssertionError(f"{name} exited with {processes[name].returncode}:\n"
                                         + logs[name].read_text(errors="replace")[-3000:])
                return _health(ports[name]["health"]) == "SERVING"
            # A hang guard, not a timing assertion.
            wait_until(serving, f"{name} SERVING on its health port", timeout_s=600, interval_s=0.5)
            # The gRPC port is mutual TLS only: the plaintext probe kubelet would send gets nowhere.
            assert _health(ports[name]["grpc"]) == "UNAVAILABLE", name
            metrics, ca = ports[name]["metrics"], Path(environments[name]["TLS_CA_FILE"])
            assert _scrape(metrics, ca, SCRAPE_TOKEN) == 200, name
            assert _scrape(metrics, ca, None) == 401, name
            assert _scrape(metrics, None, SCRAPE_TOKEN) == -1, name        # no plaintext

        # The features service consumes the delta stream over mutual TLS (its slot held, through
        # the TLS etcd, by a collector): seen by an operator's client with its own certificate
        # and token, like any other.
        operator = cluster_ca.issue("oncall", dns=(), ips=()).write(tmp_path, "oncall")
        cluster_ca.write(tmp_path / "ca.pem")
        client = load(SecurityConfig, {"TLS_CA_FILE": str(tmp_path / "ca.pem"), "TLS_CERT_FILE": str(operator[0]),
                                       "TLS_KEY_FILE": str(operator[1]), "TLS_SERVER_NAME": server_name,
                                       "AUTH_CLIENT_TOKEN": "operator-token-0123456789"})
        collector = collector_pb2_grpc.CollectorServiceStub(channels.make_channel(
            local["collector:8080"], channels.COLLECTOR, security=client))

        def features_streaming() -> bool:
            groups = collector.ListConsumerGroups(collector_pb2.ListConsumerGroupsRequest(), timeout=10).groups
            return any(group.name == "features" and group.active and group.holder for group in groups)
        assert wait_until(features_streaming, "features consuming the delta stream over mTLS", 300, 1.0)

        # The ranker registered itself in the TLS etcd (its client certificate's CN is its etcd user).
        etcd = Etcd.from_config(load(EtcdConfig, {"ETCD_ENDPOINT": etcd_endpoint, "ETCD_PREFIX": prefix,
                                                  **etcd_access.as_environment()}))
        try:
            assert wait_until(lambda: etcd.get_prefix(RANKERS_PREFIX), "the ranker's registration", 120)
        finally:
            etcd.close()
    finally:
        stop_like_the_kubelet(processes, workloads)
    assert_stopped_cleanly(processes, workloads, logs)
