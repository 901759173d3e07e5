"""deploy/k8s security: the prod overlay runs every service with mutual TLS (its own certificate,
from cert-manager), roles, etcd over TLS and HTTPS metrics behind a token, with probes on the
plaintext health port; dev is plaintext and says so; the scrape configurations of
deploy/monitoring match what prod serves.

Beyond the shape, the prod environment of each workload is built as the kubelet would (ConfigMap,
`env`, Secret volumes at their mount paths, here filled with certificates made at run time in
the layout the Secrets have) and loaded by that service's own config class: a path that no
volume provides, a key name the Secret does not have or a setting the service refuses fails here.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml

from scripts.pki import CertificateAuthority
from services.common.config import CommonConfig, load
from tests.deploy.manifests import REPO_ROOT, container_environment, find, render, service_workloads

MONITORING = REPO_ROOT / "deploy" / "monitoring"
SERVICES = {"collector", "features", "trainer", "ranker", "consistency"}
FIELDS = {"metadata.name": "pod-0", "metadata.namespace": "deltarec", "status.podIP": "10.0.0.7"}
# What every prod service must set, and to what (None: any non-empty value).
REQUIRED = {"TLS_CERT_FILE": None, "TLS_KEY_FILE": None, "TLS_CLIENT_CA_FILE": None, "TLS_CA_FILE": None,
            "TLS_SERVER_NAME": None, "AUTH_ENABLED": "true", "AUTH_TOKENS_FILE": None, "AUTH_IDENTITIES": None,
            "ETCD_CA_FILE": None, "ETCD_CERT_FILE": None, "ETCD_KEY_FILE": None, "METRICS_TLS": "auto",
            "METRICS_BEARER_TOKEN_FILE": None, "HEALTH_PORT": None}
FILE_SETTINGS = [name for name in REQUIRED if name.endswith("_FILE")]


def prod():
    objects = render("prod")
    workloads = service_workloads(objects)
    assert {w.name for w in workloads} == SERVICES
    return objects, workloads


def _secret_mounts(workload) -> dict[str, dict]:
    """mountPath -> the Secret volume mounted there (read-only mounts only)."""
    volumes = {v["name"]: v for v in workload.pod_spec["volumes"]}
    return {m["mountPath"]: volumes[m["name"]]["secret"] for m in workload.container["volumeMounts"]
            if "secret" in volumes[m["name"]] and m.get("readOnly")}


def _provided_by(path: str, mounts: dict[str, dict]) -> tuple[str, dict] | None:
    """The (mountPath, secret volume) whose items include the file `path`."""
    for mount_path, secret in mounts.items():
        prefix = mount_path.rstrip("/") + "/"
        if path.startswith(prefix) and path[len(prefix):] in {item["path"] for item in secret.get("items", [])}:
            return mount_path, secret
    return None


def test_every_prod_service_sets_tls_auth_etcd_tls_and_metrics_settings_from_mounted_secrets():
    objects, workloads = prod()
    for workload in workloads:
        env = container_environment(workload, objects, FIELDS)
        for name, expected in REQUIRED.items():
            assert env.get(name), f"{workload.name}: {name} is not set"
            if expected is not None:
                assert env[name] == expected, f"{workload.name}: {name}={env[name]!r}"
        mounts = _secret_mounts(workload)
        for name in FILE_SETTINGS:
            assert _provided_by(env[name], mounts), \
                f"{workload.name}: {name}={env[name]} is no file of a read-only Secret volume"
        # Its own certificate: the Secret cert-manager renews for this service, nobody else's.
        _, tls_secret = _provided_by(env["TLS_CERT_FILE"], mounts)
        assert tls_secret["secretName"] == f"deltarec-tls-{workload.name}"
        assert _provided_by(env["TLS_KEY_FILE"], mounts)[1] is tls_secret
        assert tls_secret["defaultMode"] == 0o440
        # No secret travels in the environment.
        assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in workload.container.get("env", []))
        assert not any("secretRef" in source for source in workload.container.get("envFrom", []))


def test_prod_probes_use_the_plaintext_health_port_and_dev_the_grpc_port():
    objects, workloads = prod()
    for workload in workloads:
        env = container_environment(workload, objects, FIELDS)
        health = int(env["HEALTH_PORT"])
        assert workload.port("health") == health != workload.grpc_port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert workload.container[probe]["grpc"]["port"] == health, f"{workload.name} {probe}"
            assert workload.container[probe].get("periodSeconds"), "the base probe settings were kept"
    for workload in service_workloads(render("dev")):
        assert workload.container["readinessProbe"]["grpc"]["port"] == workload.grpc_port


def test_every_service_identity_has_its_role_and_the_certificates_carry_it():
    objects, workloads = prod()
    env = container_environment(workloads[0], objects, FIELDS)
    identities = dict(entry.split("=", 1) for entry in env["AUTH_IDENTITIES"].split(","))
    assert identities == {f"spiffe://deltarec/{name}": "operator" if name == "consistency" else "service"
                          for name in SERVICES}
    certificates = {obj["spec"]["secretName"]: obj for obj in objects if obj["kind"] == "Certificate"}
    for workload in workloads:
        certificate = certificates[f"deltarec-tls-{workload.name}"]["spec"]
        assert certificate["uris"] == [f"spiffe://deltarec/{workload.name}"]
        assert {"server auth", "client auth"} <= set(certificate["usages"])
        # What clients dial (the headless Service name) and the shared name for pod-IP dials.
        assert {workload.name, f"{workload.name}.deltarec.svc", env["TLS_SERVER_NAME"]} <= set(certificate["dnsNames"])
        assert certificate["issuerRef"]["name"] == find(objects, "Issuer", "deltarec-ca")["metadata"]["name"]
        assert certificate["privateKey"]["rotationPolicy"] == "Always"


def _write_secret_files(workload, mounts, root: Path, pki: dict) -> dict[str, Path]:
    """A local directory per Secret mount, holding the items the volume names, filled the way the
    real Secret is (PEM certificates, keys, tokens)."""
    local = {}
    for mount_path, secret in mounts.items():
        directory = root / secret["secretName"]
        directory.mkdir(parents=True, exist_ok=True)
        content = pki.get(secret["secretName"], {})
        for item in secret.get("items", []):
            assert item["key"] in content, f"{workload.name}: no stand-in for {secret['secretName']}/{item['key']}"
            (directory / item["path"]).write_bytes(content[item["key"]])
        local[mount_path] = directory
    return local


def test_the_prod_environment_is_accepted_by_every_services_own_config(tmp_path):
    objects, workloads = prod()
    cluster_ca, etcd_ca = CertificateAuthority("cluster-ca"), CertificateAuthority("etcd-ca")
    etcd_client = etcd_ca.issue("deltarec")
    pki = {"deltarec-db": {"DATABASE_URL": b"postgresql+psycopg2://deltarec:pw@db.internal:5432/deltarec"},
           "deltarec-auth": {"tokens": b"storefront:web:storefront-token-0123456789\n"
                                       b"operator:oncall:operator-token-0123456789\n"},
           "deltarec-metrics-scrape": {"token": b"prometheus-scrape-token-0123456789\n"},
           "deltarec-etcd-client": {"ca.crt": etcd_ca.pem, "tls.crt": etcd_client.cert_pem,
                                    "tls.key": etcd_client.key_pem}}
    for name in SERVICES:
        leaf = cluster_ca.issue(name, uris=(f"spiffe://deltarec/{name}",))
        pki[f"deltarec-tls-{name}"] = {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem, "ca.crt": cluster_ca.pem}
    for workload in workloads:
        env = container_environment(workload, objects, FIELDS)
        local = _write_secret_files(workload, _secret_mounts(workload), tmp_path / workload.name, pki)
        for name, value in env.items():
            for mount_path, directory in local.items():
                if value.startswith(mount_path.rstrip("/") + "/"):
                    env[name] = str(directory / value[len(mount_path.rstrip("/")) + 1:])
        module = importlib.import_module(workload.module + ".config")
        classes = [value for value in vars(module).values() if isinstance(value, type)
                   and dataclasses.is_dataclass(value) and issubclass(value, CommonConfig) and value is not CommonConfig]
        assert classes, workload.module
        config = load(classes[0], env)         # raises ConfigError naming what is wrong
        assert config.auth_enabled and config.tls_client_ca_file and config.etcd_cert_file
        assert config.health_port == workload.port("health")


def test_dev_is_plaintext_and_says_so():
    objects = render("dev")
    for workload in service_workloads(objects):
        env = container_environment(workload, objects, FIELDS)
        set_ = sorted(name for name in env if name.startswith(("TLS_", "AUTH_", "HEALTH_"))
                      or name in ("ETCD_CA_FILE", "ETCD_CERT_FILE", "ETCD_KEY_FILE", "ETCD_USER",
                                  "METRICS_TLS", "METRICS_CLIENT_CA_FILE", "METRICS_BEARER_TOKEN_FILE"))
        assert not set_, f"dev {workload.name} half-configures security: {set_}"
        assert "deltarec.io/metrics-scheme" not in (workload.obj["spec"]["template"]["metadata"].get("annotations") or {})
    assert "PLAINTEXT" in (REPO_ROOT / "deploy" / "k8s" / "overlays" / "dev" / "kustomization.yaml").read_text()


def _keeps(relabel: list[dict], labels: dict[str, str]) -> bool:
    """Prometheus keep/drop relabelling of a target with these discovered labels (regex anchored)."""
    import re
    for rule in relabel:
        if rule.get("action") not in ("keep", "drop"):
            continue
        value = ";".join(labels.get(label, "") for label in rule["source_labels"])
        matched = re.fullmatch(rule["regex"], value) is not None
        if matched != (rule["action"] == "keep"):
            return False
    return True


def _targets(overlay: str) -> list[dict[str, str]]:
    """The discovered labels of each pod's metrics port, as Prometheus' pod role would see them."""
    found = []
    for obj in render(overlay):
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        template = obj["spec"]["template"]["metadata"]
        annotations = template.get("annotations") or {}
        for container in obj["spec"]["template"]["spec"]["containers"]:
            for port in container.get("ports", []):
                labels = {"__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                          "name": obj["metadata"]["name"]}
                for key, value in annotations.items():
                    labels["__meta_kubernetes_pod_annotation_" + key.replace(".", "_").replace("/", "_").replace("-", "_")] = value
                found.append(labels)
    return found


def test_prometheus_scrapes_prod_over_https_with_the_token_and_dev_in_plaintext():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    https = jobs["deltarec-https"]
    assert https["scheme"] == "https" and https["tls_config"]["ca_file"] and https["authorization"]["credentials_file"]
    objects, workloads = prod()
    env = container_environment(workloads[0], objects, FIELDS)
    assert https["tls_config"]["server_name"] == env["TLS_SERVER_NAME"]
    for overlay, job, other in (("prod", "deltarec-https", "deltarec"), ("dev", "deltarec", "deltarec-https")):
        scraped = {t["name"] for t in _targets(overlay) if _keeps(jobs[job]["relabel_configs"], t)}
        assert SERVICES <= scraped, (overlay, job, scraped)
        assert not any(_keeps(jobs[other]["relabel_configs"], t) for t in _targets(overlay)
                       if t["name"] in SERVICES), f"{overlay} services scraped by {other} too"
        # Only the metrics ports: never the gRPC or health ports.
        assert all(t["__meta_kubernetes_pod_container_port_name"] == "metrics"
                   for t in _targets(overlay) if _keeps(jobs[job]["relabel_configs"], t))


def test_the_service_monitor_scrapes_every_service_over_https_with_the_token():
    monitor = yaml.safe_load((MONITORING / "servicemonitor.yaml").read_text())
    assert monitor["kind"] == "ServiceMonitor"
    objects, workloads = prod()
    env = container_environment(workloads[0], objects, FIELDS)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["serverName"] == env["TLS_SERVER_NAME"]
    token_secret = endpoint["authorization"]["credentials"]
    mounted = {secret["secretName"]: secret for w in workloads for secret in _secret_mounts(w).values()}
    assert token_secret["name"] in mounted and token_secret["key"] in {i["key"] for i in mounted[token_secret["name"]]["items"]}
    assert endpoint["tlsConfig"]["ca"]["secret"]["name"] == find(objects, "Issuer", "deltarec-ca")["spec"]["ca"]["secretName"]
    selected = monitor["spec"]["selector"]["matchExpressions"][0]["values"]
    services = [obj for obj in objects if obj["kind"] == "Service"
                and obj["metadata"]["labels"].get("app.kubernetes.io/name") in selected]
    assert {s["metadata"]["name"] for s in services} == SERVICES
    assert all(any(p["name"] == endpoint["port"] for p in s["spec"]["ports"]) for s in services)
