"""examples/storefront-node against the local suite: the contract is usable from another language
with nothing but the .proto files (@grpc/grpc-js + @grpc/proto-loader, pinned in its
package-lock.json; `make node-example` installs them with npm ci)."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.deploy.manifests import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "storefront-node"

pytestmark = pytest.mark.timeout(900)


def test_node_storefront_upserts_sends_events_and_gets_recommendations_and_search(service_env, start_service):
    node = shutil.which("node")
    if node is None or not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("node or the example's packages are missing: `make node-example` installs them")
    collector = start_service("services.collector", {**service_env, "COLLECTOR_HEARTBEAT_S": "0.5"})
    features = start_service("services.features", {**service_env, "COLLECTOR_ADDRESS": collector.address,
                                                   "FEATURES_TORCH_THREADS": "1"}, timeout_s=300)
    ranker = start_service("services.ranker", {**service_env, "FEATURES_ADDRESS": features.address,
                                               "RANKER_REPLICA_ID": "ranker-node"}, timeout_s=300)
    # dns:/// as in a cluster (an IP literal resolves to itself).
    result = subprocess.run([node, "storefront.js"], cwd=EXAMPLE, capture_output=True, text=True, timeout=240,
                            env={"PATH": "/usr/bin:/bin", "COLLECTOR_ADDRESS": f"dns:///{collector.address}",
                                 "RANKER_ADDRESS": f"dns:///{ranker.address}", "SEARCH_WAIT_MS": "120000",
                                 "RANKER_CONNECTIONS": "3"})
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["upserted"] == 3 and summary["events_accepted"] == 4
    assert summary["events_duplicate_on_retry"] == 4
    assert summary["search_found_new_item"] is True
    assert summary["recommended"], "no recommendation (popular and fresh items are served without a model)"
