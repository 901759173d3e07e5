"""`make run`: the whole DeltaRec suite, locally, on real data.

Starts Postgres and etcd (scripts/infra.py), then each service that exists in this
checkout (collector, features, trainer, two ranker replicas), loads the catalog
and replays the interactions through the collector as live traffic, showing
progress and each consumer group's replication lag; then shows what the storefront
can call. Data: Amazon Beauty from ../shared/data (DELTAREC_DATA_DIR to change),
or a small synthetic data set when that folder is absent.

Interactive (a terminal): services stay up until Ctrl-C. Otherwise (CI, pipes) it
stops everything after the job. DELTAREC_RUN_USERS limits the replay to N users.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from tqdm import tqdm

from deltarec.v1 import collector_pb2, collector_pb2_grpc, common_pb2

from scripts import infra
from scripts.launch import REPO_ROOT, ServiceProcess
from services.common import datasets, db

RUN_DIR = REPO_ROOT / ".run"
BATCH = 500


def say(message: str) -> None:
    print(f"\033[1m==> {message}\033[0m", flush=True)


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


class LocalSuite:
    def __init__(self) -> None:
        self.processes: list[ServiceProcess] = []
        self.env: dict[str, str] = {}

    def start_infra(self) -> None:
        say("starting Postgres (wal_level=logical) and etcd")
        env = infra.start(RUN_DIR / "infra")
        db.migrate(env.database_url)
        self.env = {**env.as_environment(), "GRPC_PORT": "0", "METRICS_PORT": "0", "LOG_LEVEL": "INFO"}
        print(f"    postgres 127.0.0.1:{env.pg_port}  etcd {env.etcd_endpoint}  logs {RUN_DIR / 'logs'}")

    def start(self, module: str, name: str, extra: dict[str, str] | None = None) -> ServiceProcess:
        process = ServiceProcess(module, {**self.env, **(extra or {})}, name=name,
                                 log_dir=RUN_DIR / "logs").start(timeout_s=600)
        self.processes.append(process)
        print(f"    {name:<12} grpc 127.0.0.1:{process.port}  metrics :{process.metrics_port}")
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop(timeout_s=20)
        infra.stop(RUN_DIR / "infra")


def load_catalog(stub, dataset: datasets.Dataset) -> None:
    say(f"loading the {dataset.name} catalog: {len(dataset.items)} items")
    with tqdm(total=len(dataset.items), unit="item", file=sys.stdout) as bar:
        for start in range(0, len(dataset.items), BATCH):
            chunk = dataset.items[start:start + BATCH]
            stub.UpsertItems(collector_pb2.UpsertItemsRequest(items=[
                common_pb2.Item(item_id=item.item_id, title=item.title, category=item.category,
                                brand=item.brand, active=True) for item in chunk]), timeout=60)
            bar.update(len(chunk))


def replay(stub, dataset: datasets.Dataset, on_progress=None) -> int:
    """Replays the interactions as purchases with synthetic increasing timestamps ending now."""
    order = dataset.replay_order()
    say(f"replaying {len(order)} interactions of {len(dataset.sequences)} users through the collector")
    start = datetime.now(timezone.utc) - timedelta(seconds=len(order) + 60)
    accepted = 0
    with tqdm(total=len(order), unit="event", file=sys.stdout) as bar:
        for offset in range(0, len(order), BATCH):
            events = []
            for position, (user, item) in enumerate(order[offset:offset + BATCH], start=offset):
                stamp = Timestamp()
                stamp.FromDatetime(start + timedelta(seconds=position))
                events.append(common_pb2.Event(event_id=f"{dataset.name}-{position}", user_id=user,
                                               item_id=item, type=common_pb2.EVENT_TYPE_PURCHASE,
                                               timestamp=stamp))
            response = stub.IngestEvents(collector_pb2.IngestEventsRequest(events=events), timeout=60)
            accepted += response.accepted
            bar.update(len(events))
            if on_progress:
                on_progress(bar)
    return accepted


def group_lag_line(stub) -> str:
    try:
        groups = stub.ListConsumerGroups(collector_pb2.ListConsumerGroupsRequest(), timeout=5).groups
    except grpc.RpcError:
        return ""
    return "  ".join(f"{g.name}: lag {g.retained_wal_bytes / 1024:.0f} KiB" for g in groups)


def main() -> int:
    suite = LocalSuite()
    interactive = sys.stdin.isatty()
    try:
        suite.start_infra()
        say("starting services")
        collector = suite.start("services.collector", "collector")
        stub = collector_pb2_grpc.CollectorServiceStub(grpc.insecure_channel(collector.address))
        extras = [module for module in ("services.features", "services.trainer", "services.ranker")
                  if module_exists(module + ".__main__")]
        collector_env = {"COLLECTOR_ADDRESS": collector.address}
        for module in extras:
            if module == "services.ranker":
                for replica in ("a", "b"):
                    suite.start(module, f"ranker-{replica}", {**collector_env, "RANKER_REPLICA_ID": f"ranker-{replica}"})
            else:
                suite.start(module, module.rsplit(".", 1)[-1], collector_env)

        users = os.environ.get("DELTAREC_RUN_USERS")
        dataset = datasets.load_default(max_users=int(users) if users else None)
        if dataset.name == "synthetic":
            print("    ../shared/data/amazon-beauty not found: using a synthetic data set")
        load_catalog(stub, dataset)

        last_lag = [0.0]

        def show_lag(bar) -> None:
            if time.monotonic() - last_lag[0] > 5:
                last_lag[0] = time.monotonic()
                line = group_lag_line(stub)
                if line:
                    bar.write(f"    consumer groups  {line}")
        accepted = replay(stub, dataset, on_progress=show_lag)
        say(f"replay done: {accepted} events accepted")
        line = group_lag_line(stub)
        if line:
            print(f"    consumer groups  {line}")

        print("\nTry the collector (no proto files needed, the server speaks reflection):")
        print(f"  .venv/bin/grpcurl -plaintext {collector.address} list")
        print(f"  .venv/bin/grpcurl -plaintext -d '{{\"events\":[{{\"event_id\":\"demo-1\",\"type\":\"EVENT_TYPE_VIEW\","
              f"\"user_id\":\"1\",\"item_id\":\"42\"}}]}}' {collector.address} deltarec.v1.CollectorService/IngestEvents")
        if interactive:
            say("running; Ctrl-C stops everything")
            threading.Event().wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        say("stopping")
        suite.stop_all()


if __name__ == "__main__":
    sys.exit(main())
