"""deploy/monitoring: the alerting rules are valid (promtool check rules) and fire when they
should (promtool test rules), and every metric and label a rule or a dashboard panel uses is one
the code exports — so a renamed metric cannot leave a silent panel or a dead alert behind."""
from __future__ import annotations

import importlib
import json
import pkgutil
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import REGISTRY

from tests.deploy.manifests import REPO_ROOT

MONITORING = REPO_ROOT / "deploy" / "monitoring"
# Labels Prometheus adds (scrape config in prometheus.yml) or that PromQL itself provides.
TARGET_LABELS = {"namespace", "pod", "app", "instance", "job", "le", "quantile"}
PROMETHEUS_BUILTINS = {"up"}
METRIC = re.compile(r"\b(deltarec_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b(deltarec_[a-z0-9_]+|up)\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool missing: `make system-deps` installs Debian's prometheus package")
    return path


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Every series name the services can expose -> its label names, from the code itself: every
    module under services/ is imported and the default registry's collectors are read."""
    import services
    for module in pkgutil.walk_packages(services.__path__, "services."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    names: dict[str, set[str]] = {}
    for collector, series in REGISTRY._collector_to_names.items():   # noqa: SLF001 - read only
        labels = set(getattr(collector, "_labelnames", ()))
        for name in series:
            if name.startswith("deltarec_"):
                names[name] = labels
    assert "deltarec_grpc_calls_total" in names and "deltarec_grpc_latency_seconds_bucket" in names
    return names


def _rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def _panel_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") == "query":
            found.append((f"variable {variable['name']}", variable["query"]["query"]))
    return found


def test_promtool_accepts_the_rules():
    result = subprocess.run([promtool(), "check", "rules", str(MONITORING / "alerts.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_fires_in_its_rule_test():
    result = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=MONITORING,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", (MONITORING / "alerts_test.yml").read_text()))
    required = {"DeltaRecConsumerLagging", "DeltaRecAbandonedSlot", "DeltaRecRankersDisagreeOnVersion",
                "DeltaRecHighErrorRate", "DeltaRecRefusedArtifact"}
    assert required <= tested


def test_the_issues_alerts_exist():
    alerts = {name for name, _ in _rule_expressions()}
    assert {"DeltaRecConsumerLagging", "DeltaRecAbandonedSlot", "DeltaRecRankersDisagreeOnVersion",
            "DeltaRecHighErrorRate", "DeltaRecRefusedArtifact"} <= alerts


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_and_label_used_is_exported_by_the_code(source, exported):
    expressions = _rule_expressions() if source == "rules" else _panel_expressions()
    assert expressions
    problems = []
    for where, expr in expressions:
        used = set(METRIC.findall(expr))
        problems += [f"{where}: {name} is not exported" for name in sorted(used - set(exported))]
        labels_here = set().union(*(exported.get(name, set()) for name in used)) | TARGET_LABELS
        for name, matchers in SELECTOR.findall(expr):
            allowed = exported.get(name, set()) | TARGET_LABELS
            problems += [f"{where}: {name} has no label {label}"
                         for label in MATCHER.findall(matchers) if label not in allowed]
        for grouping in GROUPING.findall(expr):
            problems += [f"{where}: no metric of the expression has label {label}"
                         for label in (part.strip() for part in grouping.split(",")) if label and label not in labels_here]
        bare = set(re.findall(r"\b(up)\{", expr)) - PROMETHEUS_BUILTINS
        problems += [f"{where}: {name}" for name in bare]
    assert not problems, "\n".join(problems)


def test_the_dashboard_covers_the_operators_questions():
    expressions = " ".join(expr for _, expr in _panel_expressions())
    for metric in ("deltarec_grpc_calls_total", "deltarec_grpc_errors_total", "deltarec_grpc_latency_seconds_bucket",
                   "deltarec_cdc_lag_seconds", "deltarec_cdc_lag_bytes", "deltarec_ranker_data_lsn",
                   "deltarec_features_applied_lsn", "deltarec_ranker_model_version", "deltarec_ranker_canary_share",
                   "deltarec_consistency_findings"):
        assert metric in expressions, metric
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_scrape_config_loads_the_rules_and_keeps_the_metrics_ports():
    """promtool check config cannot be used: Debian's prometheus is built without the
    Kubernetes service discovery this file uses. Checked here: it is YAML Prometheus would read
    for the rules, and it keeps the ports the manifests name `metrics`."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    for job in config["scrape_configs"]:
        relabel = job["relabel_configs"]
        assert {r["target_label"] for r in relabel if "target_label" in r} >= {"namespace", "pod", "app", "worker"}
        scheme = "https" if job["job_name"].endswith("https") else ""
        # The manifests' `metrics` port, a ranker worker's `metrics-w<i>` (9090 + i), nothing else.
        assert _relabel(relabel, _target("metrics", scheme))["worker"] == "0", job["job_name"]
        assert _relabel(relabel, _target("metrics-w3", scheme))["worker"] == "3", job["job_name"]
        for other in ("grpc", "metricsx", "metrics-w", "health"):
            assert _relabel(relabel, _target(other, scheme)) is None, (job["job_name"], other)
        assert _relabel(relabel, _target("metrics", "https" if not scheme else "")) is None


def _target(port_name: str, scheme: str) -> dict:
    return {"__meta_kubernetes_pod_container_port_name": port_name, "__meta_kubernetes_namespace": "deltarec",
            "__meta_kubernetes_pod_name": "ranker-abc", "__meta_kubernetes_pod_label_app_kubernetes_io_name": "ranker",
            "__meta_kubernetes_pod_annotation_deltarec_io_metrics_scheme": scheme}


def _relabel(rules: list[dict], labels: dict) -> dict | None:
    """Prometheus's relabelling (keep, drop, replace; anchored regex, `;` separator, `$n`
    references) for the rules this config uses; None = the target is dropped."""
    labels = dict(labels)
    for rule in rules:
        value = ";".join(labels.get(name, "") for name in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep" and not match or action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$\{?(\d+)\}?", lambda ref: match.group(int(ref.group(1))) or "",
                                 rule.get("replacement", "$1"))
            labels[rule["target_label"]] = replacement
    return labels
