"""deploy/k8s: the overlays render, validate against the Kubernetes API schemas offline, pass the
checkov scan, and hold the properties the deployment promises (hardened pods, probes, drain
times, singletons under rolling updates, headless Services, and network paths that are exactly
the design's)."""
from __future__ import annotations

import itertools
import json
import re
import subprocess

import pytest

from tests.deploy.manifests import (K8S_DIR, OVERLAYS, REPO_ROOT, find, render, render_text,
                                    service_workloads, tool)

KUBERNETES_VERSION = "1.37.0"   # the schemas shipped by the pinned kubernetes-validate


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_against_the_api_schemas(overlay, tmp_path):
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(render_text(overlay))
    result = subprocess.run([str(tool("kubernetes-validate")), "--strict", "--quiet",
                             "-k", KUBERNETES_VERSION, str(rendered)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {obj["kind"] for obj in render(overlay)}
    assert {"Deployment", "Service", "NetworkPolicy", "ConfigMap", "PodDisruptionBudget"} <= kinds


def test_schema_validation_rejects_a_broken_object(tmp_path):
    """The validator is strict: a misspelt field fails (so a pass above means something)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(render_text("prod").replace("terminationGracePeriodSeconds:", "terminationGracePeriod:", 1))
    result = subprocess.run([str(tool("kubernetes-validate")), "--strict", "--quiet",
                             "-k", KUBERNETES_VERSION, str(broken)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "terminationGracePeriod" in result.stdout + result.stderr


def _checkov(*args: str) -> dict:
    result = subprocess.run([str(tool("checkov")), "-o", "json", *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    report = json.loads(result.stdout or "{}")
    return {"failed": [check for r in (report if isinstance(report, list) else [report])
                       for check in r.get("results", {}).get("failed_checks", [])],
            "skipped": [check for r in (report if isinstance(report, list) else [report])
                        for check in r.get("results", {}).get("skipped_checks", [])],
            "passed": {r.get("check_type"): r.get("summary", {}).get("passed", 0)
                       for r in (report if isinstance(report, list) else [report])}}


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory) -> dict:
    """One scan (checkov takes ~20 s to start): both rendered overlays and the Dockerfile."""
    folder = tmp_path_factory.mktemp("rendered")
    files = []
    for overlay in OVERLAYS:
        (folder / f"{overlay}.yaml").write_text(render_text(overlay))
        files += ["-f", str(folder / f"{overlay}.yaml")]
    return _checkov(*files, "-f", str(REPO_ROOT / "deploy" / "Dockerfile"), "--framework", "kubernetes", "dockerfile")


def test_checkov_finds_nothing_in_the_rendered_overlays_and_the_dockerfile(checkov_report):
    assert not checkov_report["failed"], [(c["check_id"], c["resource"], c["file_path"]) for c in checkov_report["failed"]]
    assert checkov_report["passed"].get("kubernetes", 0) > 500 and checkov_report["passed"].get("dockerfile", 0) > 20, \
        checkov_report["passed"]
    # Every skip carries its reason next to it (a checkov.io/skipN annotation "ID=reason").
    assert checkov_report["skipped"]
    for check in checkov_report["skipped"]:
        assert len((check.get("check_result") or {}).get("suppress_comment", "")) > 20, check["check_id"]


def test_checkov_finds_no_secret_in_the_sources():
    report = _checkov("-d", str(K8S_DIR), "--framework", "secrets")
    assert not report["failed"], [(c["check_id"], c["file_path"]) for c in report["failed"]]


# ------------------------------------------------------------------ properties of every pod
def _pods(overlay):
    for obj in render(overlay):
        if obj["kind"] in ("Deployment", "StatefulSet"):
            yield obj


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_hardened_and_bounded(overlay):
    for obj in _pods(overlay):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = obj["spec"]["template"]["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] >= 10000, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] == pod["runAsUser"], name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{name} {kind}"
            assert container["readinessProbe"] and container["livenessProbe"], name


def _seconds(value) -> float:
    return float(value)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_pods_probe_their_grpc_port_and_outlive_their_drain(overlay):
    objects = render(overlay)
    config = find(objects, "ConfigMap", "deltarec-config")["data"]
    grace = _seconds(config["SHUTDOWN_GRACE_S"])
    for workload in service_workloads(objects):
        container, spec = workload.container, workload.pod_spec
        assert workload.grpc_port == int(config["GRPC_PORT"])
        # prod's gRPC port is mutual TLS, which kubelet's probe cannot speak: it probes the
        # plaintext health-only port (HEALTH_PORT, test_manifests_security.py).
        probed = int(config.get("HEALTH_PORT", config["GRPC_PORT"]))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == probed, f"{workload.name} {probe}"
        assert workload.metrics_port == int(config["METRICS_PORT"])
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        # SIGTERM comes after preStop; the process then drains for SHUTDOWN_GRACE_S.
        assert spec["terminationGracePeriodSeconds"] > pre_stop + grace + 5, workload.name
        # Writable places are emptyDirs; the Secret is a read-only file.
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert "/tmp" in mounts
        assert mounts["/var/run/secrets/deltarec/db"]["readOnly"] is True
        assert not any(e.get("valueFrom", {}).get("secretKeyRef") for e in container.get("env", []))
        assert not any("secretRef" in source for source in container.get("envFrom", []))


def test_slow_starters_have_a_startup_budget_above_their_own_timeout():
    workloads = {w.name: w for w in service_workloads(render("dev"))}
    ranker = workloads["ranker"].container
    env = {e["name"]: e.get("value") for e in ranker["env"]}
    budget = ranker["startupProbe"]["periodSeconds"] * ranker["startupProbe"]["failureThreshold"]
    assert budget > float(env["RANKER_STARTUP_TIMEOUT_S"])
    features = workloads["features"].container["startupProbe"]
    assert features["periodSeconds"] * features["failureThreshold"] >= 120   # torch + MiniLM


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_singletons_roll_with_a_standby_never_below_their_count(overlay):
    """Lease-held roles: a rollout adds one pod (it waits as standby) before removing one."""
    workloads = {w.name: w.obj for w in service_workloads(render(overlay))}
    for name in ("collector", "trainer", "features", "consistency"):
        strategy = workloads[name]["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate", name
        assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}, name
    assert workloads["ranker"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_are_headless_so_clients_balance_per_pod(overlay):
    objects = render(overlay)
    config = find(objects, "ConfigMap", "deltarec-config")["data"]
    for workload in service_workloads(objects):
        service = find(objects, "Service", workload.name)
        assert service["spec"]["clusterIP"] == "None", workload.name
        assert service["spec"]["selector"] == workload.obj["spec"]["selector"]["matchLabels"]
    assert config["COLLECTOR_ADDRESS"].startswith("dns:///collector:")
    assert config["FEATURES_ADDRESS"].startswith("dns:///features:")


# ------------------------------------------------------------------ network paths
STOREFRONT = {"namespace": {"deltarec.io/storefront": "true", "kubernetes.io/metadata.name": "shop"},
              "labels": {"app": "storefront"}}
PROMETHEUS = {"namespace": {"kubernetes.io/metadata.name": "monitoring"},
              "labels": {"app.kubernetes.io/name": "prometheus"}}
DNS = {"namespace": {"kubernetes.io/metadata.name": "kube-system"}, "labels": {"k8s-app": "kube-dns"}}

# The design's paths (docs/DESIGN.md) between the parts, by port; nothing else may pass.
SERVICES = ("collector", "features", "trainer", "ranker", "consistency")
EXPECTED = (
    {("storefront", "collector", 8080), ("storefront", "ranker", 8080),
     ("features", "collector", 8080), ("trainer", "collector", 8080), ("ranker", "features", 8080)}
    | {("consistency", name, 8080) for name in ("collector", "features", "ranker", "trainer")}
    | {("prometheus", name, 9090) for name in SERVICES}
    | {(name, "dns", 53) for name in SERVICES}
)
DEV_EXPECTED = (
    {(name, "postgres", 5432) for name in SERVICES} | {(name, "etcd", 2379) for name in SERVICES}
    | {("etcd", "etcd", 2380), ("prometheus", "etcd", 2381), ("postgres", "dns", 53), ("etcd", "dns", 53)}
)


def _matches(selector: dict, labels: dict) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def _peer_matches(peer: dict, endpoint: dict, own_namespace: dict) -> bool:
    if "ipBlock" in peer:
        return False
    namespace_selector = peer.get("namespaceSelector")
    if namespace_selector is None:
        if endpoint["namespace"] != own_namespace:
            return False
    elif not _matches(namespace_selector, endpoint["namespace"]):
        return False
    return _matches(peer.get("podSelector") or {}, endpoint["labels"])


def _rule_allows(rule: dict, peer_key: str, peer: dict, port: int, own_namespace: dict) -> bool:
    peers = rule.get(peer_key)
    if peers is not None and not any(_peer_matches(p, peer, own_namespace) for p in peers):
        return False
    ports = rule.get("ports")
    return ports is None or any(p.get("port") == port or p.get("port", 0) <= port <= p.get("endPort", -1)
                                for p in ports)


def _allowed(policies, source: dict, destination: dict, port: int, namespace: dict) -> bool:
    """NetworkPolicy semantics: a direction is open if no policy selects the pod for it, else
    if any rule of a selecting policy admits the peer and port."""
    def direction(pod, policy_type, rules_key, peer_key, peer) -> bool:
        if pod["namespace"] != namespace:
            return True                    # outside our namespace: not ours to police
        selecting = [p for p in policies if policy_type in p["spec"]["policyTypes"]
                     and _matches(p["spec"]["podSelector"], pod["labels"])]
        if not selecting:
            return True
        return any(_rule_allows(rule, peer_key, peer, port, namespace)
                   for p in selecting for rule in p["spec"].get(rules_key) or [])
    return (direction(source, "Egress", "egress", "to", destination)
            and direction(destination, "Ingress", "ingress", "from", source))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_exactly_the_designs_paths(overlay):
    objects = render(overlay)
    namespace = {"kubernetes.io/metadata.name": "deltarec"}
    policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies), \
        "no default-deny policy"
    endpoints = {"storefront": STOREFRONT, "prometheus": PROMETHEUS, "dns": DNS}
    ports: set[int] = {53}
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            name = obj["metadata"]["name"]
            endpoints[name] = {"namespace": namespace, "labels": obj["spec"]["template"]["metadata"]["labels"]}
            for container in obj["spec"]["template"]["spec"]["containers"]:
                ports.update(p["containerPort"] for p in container.get("ports", []))
    allowed = {(a, b, port) for (a, source), (b, destination) in itertools.permutations(endpoints.items(), 2)
               for port in ports if _allowed(policies, source, destination, port, namespace)}
    allowed |= {(a, a, port) for a, endpoint in endpoints.items() for port in ports
                if endpoint["namespace"] == namespace and _allowed(policies, endpoint, endpoint, port, namespace)}
    allowed = {path for path in allowed if not (path[0] in ("storefront", "prometheus", "dns")
                                                and path[1] in ("storefront", "prometheus", "dns"))}
    expected = EXPECTED | (DEV_EXPECTED if overlay == "dev" else set())
    assert allowed == expected, {"unexpected": sorted(allowed - expected), "missing": sorted(expected - allowed)}


def test_prod_reaches_the_managed_datastores_only_by_address():
    policies = [o for o in render("prod") if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "datastore-egress"]
    rules = policies[0]["spec"]["egress"]
    assert {rule["ports"][0]["port"] for rule in rules} == {5432, 2379}
    assert all(re.fullmatch(r"[\d.]+/\d+", peer["ipBlock"]["cidr"]) for rule in rules for peer in rule["to"])
    kinds = {obj["kind"] for obj in render("prod")}
    assert "StatefulSet" not in kinds and "Secret" not in kinds   # the Secret is the DB owner's


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_autoscaler_alone_sets_the_rankers_count(overlay):
    objects = render(overlay)
    hpa = find(objects, "HorizontalPodAutoscaler", "ranker")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ranker"}
    assert "replicas" not in find(objects, "Deployment", "ranker")["spec"]
    budget = find(objects, "PodDisruptionBudget", "ranker")["spec"]["minAvailable"]
    assert budget < hpa["spec"]["minReplicas"]   # a node drain can always proceed
