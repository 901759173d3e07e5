"""Fault drills: a whole DeltaRec stack on a Postgres and an etcd of its own, a steady stream of
events with exact accounting, and the faults themselves.

Used by the short drills of tests/integration/test_faults.py, by bench/faults.py (the long run)
and by bench/soak.py. The faults act on the real processes: `kill -9`, SIGSTOP/SIGCONT (a hung
process), `pg_ctl stop -m fast` / start, etcd SIGTERM / start (with or without its data), a slow
extra consumer group, a full artifact disk (a small tmpfs, filled).

Accounting (`Ledger`): an event is **acknowledged** when an IngestEvents answer reported it
ACCEPTED, or DUPLICATE for a retry of a batch whose first answer was lost (the first attempt
committed it); **stored** = rows in `events`; **reflected** = the user's counters in features;
**recorded** = rows in the trainer's `trainer_interactions`. Lost = acknowledged and missing at
any stage; doubled = counted more than once at any stage. Only item events are sent (the trainer
records interactions, not searches), each user of the drill is the drill's own.
"""
from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deltarec.v1 import (collector_pb2, collector_pb2_grpc, common_pb2, features_pb2, features_pb2_grpc,
                         trainer_pb2, trainer_pb2_grpc)
from scripts import infra
from scripts.launch import ServiceProcess

SERVICES = ("collector", "features", "trainer", "ranker")
SERVING = health_pb2.HealthCheckResponse.SERVING
ITEM_TYPES = (common_pb2.EVENT_TYPE_VIEW, common_pb2.EVENT_TYPE_VIEW, common_pb2.EVENT_TYPE_CLICK,
              common_pb2.EVENT_TYPE_ADD_TO_CART, common_pb2.EVENT_TYPE_PURCHASE)
WORDS = ["Rose", "Amber", "Cedar", "Mint", "Velvet", "Coral", "Jasmine", "Onyx"]
KINDS = ["Lip Balm", "Face Cream", "Hair Oil", "Nail Polish", "Serum", "Cleanser"]

# Small and fast: the drills are about the plumbing, not the model.
TINY_TRAINER = {
    "TRAINER_MODEL_EPOCHS": "4", "TRAINER_MODEL_INCREMENTAL_EPOCHS": "2", "TRAINER_MODEL_DIM": "16",
    "TRAINER_MODEL_LAYERS": "1", "TRAINER_MODEL_HEADS": "1", "TRAINER_MODEL_MAX_LEN": "20",
    "TRAINER_MODEL_NEGATIVES": "-1", "TRAINER_MODEL_BATCH_SIZE": "64", "TRAINER_TORCH_THREADS": "1",
    "TRAINER_TEXT_FALLBACK": "hash", "TRAINER_MIN_TEXT_COVERAGE": "0", "TRAINER_EVAL_USERS": "40",
    "TRAINER_LEADER_TTL_S": "3", "TRAINER_GATE_TOLERANCE": "1.0", "TRAINER_LOOP_INTERVAL_S": "1",
}


def item_ids(count: int) -> list[str]:
    return [f"drill-item-{n}" for n in range(count)]


def title_of(n: int) -> str:
    return f"{WORDS[n % 8]} {WORDS[(n // 8) % 8]} {KINDS[n % 6]} {n}"


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address)


# ------------------------------------------------------------------------------ the stack

class DrillStack:
    """Private Postgres and etcd under `state_dir`, and the four services on fixed ports (a
    restarted process must be found where its peers expect it)."""

    def __init__(self, state_dir: Path, *, items: int = 120, trainer_loop: bool = False,
                 extra_env: dict[str, str] | None = None, service_env: dict[str, dict] | None = None,
                 log_dir: Path | None = None, consistency: bool = False) -> None:
        self.state = Path(state_dir).resolve()
        self.logs = Path(log_dir) if log_dir else self.state / "logs"
        self.items = item_ids(items)
        self.trainer_loop = trainer_loop
        self.extra_env = extra_env or {}
        self.service_env = service_env or {}
        self.processes: dict[str, ServiceProcess] = {}
        # The consistency service is optional (the fuzz suite calls it; the drills do not).
        self.names = SERVICES + (("consistency",) if consistency else ())
        self.ports = {name: infra.free_port() for name in self.names}
        self.artifacts = self.state / "artifacts"
        self.prefix = f"/drill-{uuid.uuid4().hex[:8]}/"
        self.database_url = ""
        self.etcd_endpoint = ""
        self.engine = None
        self._channels: dict[str, grpc.Channel] = {}

    # ---------------------------------------------------------------- infrastructure
    @property
    def pg_state(self) -> Path:
        return self.state / "pg"

    @property
    def etcd_state(self) -> Path:
        return self.state / "etcd-state"

    def start_infra(self) -> None:
        port, _ = infra.start_postgres(self.pg_state)
        self.database_url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{infra.PG_DATABASE}"
        self.etcd_state.mkdir(parents=True, exist_ok=True)
        self.etcd_endpoint = f"127.0.0.1:{infra.start_etcd(self.etcd_state)}"
        from services.common import db
        db.migrate(self.database_url)
        self.engine = sa.create_engine(self.database_url, poolclass=sa.pool.NullPool)

    def stop_postgres(self) -> None:
        infra.stop_postgres(self.pg_state)

    def start_postgres(self) -> None:
        infra.start_postgres(self.pg_state)

    def stop_etcd(self, wipe: bool = False) -> None:
        infra.stop_etcd(self.etcd_state)
        if wipe:
            shutil.rmtree(self.etcd_state / "etcd", ignore_errors=True)

    def start_etcd(self) -> None:
        infra.start_etcd(self.etcd_state)

    # ---------------------------------------------------------------- services
    def env(self, name: str) -> dict[str, str]:
        env = {"DATABASE_URL": self.database_url, "ETCD_ENDPOINT": self.etcd_endpoint, "ETCD_PREFIX": self.prefix,
               "GRPC_PORT": str(self.ports[name]), "METRICS_PORT": "0", "LOG_LEVEL": "INFO",
               "SHUTDOWN_GRACE_S": "2", "STALL_AFTER_S": "5", "COLLECTOR_HEARTBEAT_S": "0.5"}
        collector = f"127.0.0.1:{self.ports['collector']}"
        if name == "features":
            env.update({"COLLECTOR_ADDRESS": collector, "FEATURES_TORCH_THREADS": "1"})
        elif name == "trainer":
            env.update({**TINY_TRAINER, "COLLECTOR_ADDRESS": collector, "TRAINER_ID": "drill-trainer",
                        "TRAINER_ARTIFACT_URI": self.artifacts.as_uri(),
                        "TRAINER_LOOP": "1" if self.trainer_loop else "0"})
        elif name == "consistency":
            env.update({"FEATURES_ADDRESS": f"127.0.0.1:{self.ports['features']}", "COLLECTOR_ADDRESS": collector,
                        "CONSISTENCY_INSTANCE_ID": "drill-consistency", "CONSISTENCY_CHECK_INTERVAL_S": "3600"})
        elif name == "ranker":
            env.update({"FEATURES_ADDRESS": f"127.0.0.1:{self.ports['features']}", "RANKER_REPLICA_ID": "drill-r1",
                        "RANKER_LEASE_TTL_S": "3", "RANKER_ARTIFACT_RETRY_S": "2"})
        env.update(self.extra_env)
        env.update(self.service_env.get(name, {}))
        return env

    def start_service(self, name: str) -> ServiceProcess:
        process = self.processes.get(name) or ServiceProcess(f"services.{name}", self.env(name), name=name,
                                                             log_dir=self.logs)
        self.processes[name] = process
        return process.start(timeout_s=300)

    def start(self) -> "DrillStack":
        self.start_infra()
        self.start_service("collector")
        collector = collector_pb2_grpc.CollectorServiceStub(self.channel("collector"))
        collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=[
            common_pb2.Item(item_id=item, title=title_of(n), category=["Beauty > Lips", "Beauty > Skin"][n % 2],
                            brand="Drill", active=True, price=common_pb2.Money(currency_code="EUR", units=5 + n % 30))
            for n, item in enumerate(self.items)]), timeout=60)
        for name in self.names[1:]:
            self.start_service(name)
        return self

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def channel(self, name: str) -> grpc.Channel:
        if name not in self._channels:
            self._channels[name] = channel(self.address(name))
        return self._channels[name]

    def kill(self, name: str) -> None:
        self.processes[name].kill()

    def pause(self, name: str) -> None:
        self.processes[name].signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.processes[name].signal(signal.SIGCONT)

    def health(self, name: str) -> int | None:
        """The service's overall health, or None when it does not answer."""
        try:
            return health_pb2_grpc.HealthStub(self.channel(name)).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0).status
        except grpc.RpcError:
            return None

    def all_serving(self) -> bool:
        return all(self.health(name) == SERVING for name in self.processes)

    def wait_serving(self, timeout_s: float = 120.0) -> float:
        """Seconds until every service says SERVING (raises past `timeout_s`)."""
        started = time.monotonic()
        while not self.all_serving():
            if time.monotonic() - started > timeout_s:
                states = {name: self.health(name) for name in self.processes}
                raise TimeoutError(f"not every service SERVING after {timeout_s:.0f}s: {states}")
            time.sleep(0.2)
        return time.monotonic() - started

    def wal_lsn(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(sa.text("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")).scalar())

    def features_status(self):
        return features_pb2_grpc.FeaturesServiceStub(self.channel("features")).Status(
            features_pb2.FeaturesServiceStatusRequest(), timeout=5)

    def trainer_status(self):
        return trainer_pb2_grpc.TrainerServiceStub(self.channel("trainer")).Status(
            trainer_pb2.TrainerServiceStatusRequest(), timeout=5)

    def wait_caught_up(self, timeout_s: float = 180.0) -> None:
        """Until features and the trainer applied everything written so far."""
        target = self.wal_lsn()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if (self.features_status().applied_lsn >= target
                        and ("trainer" not in self.processes or self.trainer_status().recorded_lsn >= target
                             or self._trainer_has_everything())):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"features/trainer not caught up to {target} after {timeout_s:.0f}s")
            time.sleep(0.3)

    def _trainer_has_everything(self) -> bool:
        # recorded_lsn moves only with the trainer's own batches: compare rows instead.
        with self.engine.connect() as connection:
            events, recorded = connection.execute(sa.text(
                "SELECT (SELECT count(*) FROM events WHERE item_id IS NOT NULL), "
                "(SELECT count(*) FROM trainer_interactions)")).one()
        return recorded >= events

    def log_errors(self) -> dict[str, list[str]]:
        """ERROR lines (tracebacks included) per service log: a drill must leave none."""
        found = {}
        for name, process in self.processes.items():
            try:
                text = process.log_path.read_text(errors="replace")
            except OSError:
                continue
            found[name] = [line[:400] for line in text.splitlines() if '"level": "error"' in line]
        return found

    def close(self) -> None:
        for channel_ in self._channels.values():
            channel_.close()
        for process in reversed(list(self.processes.values())):
            if process.alive():
                process.signal(signal.SIGCONT)
            process.stop(timeout_s=15)
        infra.stop_etcd(self.etcd_state)
        infra.stop_postgres(self.pg_state)
        if self.engine is not None:
            self.engine.dispose()


# ------------------------------------------------------------------------------ the stream

@dataclass
class Ledger:
    acknowledged: set[str] = field(default_factory=set)
    sent: int = 0
    attempts: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    unresolved: int = 0           # events of a batch still without an answer at the end


class EventStream:
    """Item events at `rate` per second in batches of `batch`, each batch retried with the same
    event ids until it gets an answer (as a storefront with an outbox would)."""

    def __init__(self, address: str, items: list[str], *, rate: float = 50.0, batch: int = 10,
                 users: int = 40, run_id: str | None = None, timeout_s: float = 2.0) -> None:
        self.address, self.items, self.rate, self.batch = address, items, rate, batch
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.users = [f"drill-{self.run_id}-u{n}" for n in range(users)]
        self.timeout_s = timeout_s
        self.ledger = Ledger()
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drill-stream", daemon=True)
        self._rng = random.Random(self.run_id)
        self._next = 0

    @property
    def event_prefix(self) -> str:
        return f"drill-{self.run_id}-e"

    def start(self) -> "EventStream":
        self._thread.start()
        return self

    def stop(self, drain_s: float = 120.0) -> Ledger:
        """Stop sending new batches; the batch in flight keeps retrying for up to `drain_s`."""
        self._drain_deadline = time.monotonic() + drain_s
        self._stop.set()
        self._thread.join(drain_s + 10)
        return self.ledger

    def _batch(self) -> list[common_pb2.Event]:
        events = []
        for _ in range(self.batch):
            self._next += 1
            events.append(common_pb2.Event(event_id=f"{self.event_prefix}{self._next}",
                                           type=self._rng.choice(ITEM_TYPES), user_id=self._rng.choice(self.users),
                                           item_id=self._rng.choice(self.items)))
        return events

    def _run(self) -> None:
        stub = collector_pb2_grpc.CollectorServiceStub(channel(self.address))
        interval = self.batch / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            events = self._batch()
            self.ledger.sent += len(events)
            request = collector_pb2.IngestEventsRequest(events=events)
            while True:
                self.ledger.attempts += 1
                started = time.monotonic()
                try:
                    response = stub.IngestEvents(request, timeout=self.timeout_s)
                except grpc.RpcError as error:
                    self.ledger.errors[error.code().name] += 1
                    if self._stop.is_set() and time.monotonic() > self._drain_deadline:
                        self.ledger.unresolved += len(events)
                        return
                    time.sleep(0.2)
                    continue
                self.latencies.append(time.monotonic() - started)
                for result in response.results:
                    if result.status in (collector_pb2.EVENT_STATUS_ACCEPTED, collector_pb2.EVENT_STATUS_DUPLICATE):
                        self.ledger.acknowledged.add(result.event_id)
                break
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()     # behind after an outage: no burst to catch up


def account(stack: DrillStack, stream: EventStream) -> dict:
    """Counts at every stage for the stream's events (call once everything caught up)."""
    acked = stream.ledger.acknowledged
    prefix = stream.event_prefix + "%"
    with stack.engine.connect() as connection:
        stored_ids = {row[0] for row in connection.execute(
            sa.text("SELECT event_id FROM events WHERE event_id LIKE :p"), {"p": prefix})}
        stored_rows = connection.execute(sa.text("SELECT count(*) FROM events WHERE event_id LIKE :p"),
                                         {"p": prefix}).scalar()
        per_user = dict(connection.execute(sa.text(
            "SELECT user_id, count(*) FROM events WHERE event_id LIKE :p GROUP BY user_id"), {"p": prefix}).all())
        recorded_ids = {row[0] for row in connection.execute(
            sa.text("SELECT event_id FROM trainer_interactions WHERE event_id LIKE :p"), {"p": prefix})}
    features = features_pb2_grpc.FeaturesServiceStub(stack.channel("features"))
    reflected = lost_in_features = doubled_in_features = 0
    for user in stream.users:
        got = features.GetUserFeatures(features_pb2.GetUserFeaturesRequest(user_id=user), timeout=10)
        count = sum(got.features.counters.values())
        want = per_user.get(user, 0)
        reflected += count
        lost_in_features += max(0, want - count)
        doubled_in_features += max(0, count - want)
    lost_stored = len(acked - stored_ids)
    lost_recorded = len(acked - recorded_ids) if "trainer" in stack.processes else 0
    return {
        "sent": stream.ledger.sent, "acknowledged": len(acked), "stored": len(stored_ids),
        "reflected_in_features": reflected, "recorded_by_trainer": len(recorded_ids & stored_ids),
        "lost": lost_stored + lost_in_features + lost_recorded,
        "lost_detail": {"stored": lost_stored, "features": lost_in_features, "trainer": lost_recorded},
        "doubled": (stored_rows - len(stored_ids)) + doubled_in_features,
        "unacknowledged_but_stored": len(stored_ids - acked), "unresolved": stream.ledger.unresolved,
        "ingest_errors": dict(stream.ledger.errors),
    }


# ------------------------------------------------------------------------------ the faults

def fill_disk(directory: Path, size_mb: int = 4) -> bool:
    """Mounts a `size_mb` tmpfs on `directory` and fills it (root only); False when not possible."""
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(directory)],
                            capture_output=True)
    if result.returncode != 0:
        return False
    try:
        with open(directory / ".filler", "wb") as filler:
            while True:
                filler.write(b"\0" * 65536)
    except OSError:
        pass                          # ENOSPC: full
    return True


def free_disk(directory: Path) -> None:
    (directory / ".filler").unlink(missing_ok=True)


def unmount(directory: Path) -> None:
    subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def current_model_version(stack: DrillStack) -> int:
    from services.common.etcd import Etcd
    etcd = Etcd(stack.etcd_endpoint, stack.prefix)
    try:
        value = etcd.get_json("model/current")
        return int((value or {}).get("version") or 0)
    finally:
        etcd.close()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
