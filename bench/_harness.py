"""The one harness every benchmark under bench/ uses (not a benchmark itself: `make bench` skips
files whose name starts with `_`).

A benchmark starts with `import _harness` (which puts the repository and gen/ on sys.path) and
then, typically:

    with _harness.Suite("new_item") as suite:          # Postgres + etcd through scripts/infra
        collector = suite.start_collector()            # a fresh, migrated database on first use
        features = suite.start_features(collector)
        ranker = suite.start_ranker(features.address, "bench-new-item")
        ...
        summary = {...}
    _harness.print_summary(summary)                     # the LAST stdout line, one JSON object

- `Suite` starts Postgres and etcd with scripts/infra.py (state in .run/bench-infra) unless they
  run already, and at the end stops only what it started; everything else it made on the way
  (service processes, the temporary database and its replication slots, etcd clients, a
  temporary artifact store) goes too, also when the benchmark fails half way.
- `progress(...)` writes `[bench/<script>] ...` to stderr; `percentiles(...)` and `ratio(...)`
  are the figures' one definition; `print_summary` adds `wall_s` and the load average (the
  machine is shared: other work shows there).
- Data: `bench_catalog(spec)` (the Beauty catalog or a synthetic one with stand-in text vectors,
  for the benchmarks that serve from the features stand-in, `Suite.start_features_stand_in`),
  `title_vectors` (MiniLM vectors cached in .cache/), `skip` (the JSON line of a benchmark
  whose data set is absent).
- The pipeline: `catalog_messages` + `upsert_catalog` load a catalog through the collector,
  `wait_embedded` waits for the features service to have embedded it.
- Waiting in general: tests.support.wait_until, the one polling loop of tests and benchmarks.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
for _path in (REPO_ROOT, REPO_ROOT / "gen"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from scripts import infra  # noqa: E402
from scripts.launch import ServiceProcess  # noqa: E402

RUN_DIR = REPO_ROOT / ".run"
INFRA_DIR = RUN_DIR / "bench-infra"
CACHE_DIR = REPO_ROOT / ".cache"
STARTED = time.perf_counter()
SCRIPT = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "bench"


# ---------------------------------------------------------------------------- output

def progress(message: str) -> None:
    """Human-readable progress, on stderr (stdout ends with the JSON summary)."""
    print(f"[bench/{SCRIPT}] {message}", file=sys.stderr, flush=True)


def percentiles(values, *, scale: float = 1.0, digits: int = 2) -> dict:
    """p50/p95/p99/max/mean of `values` times `scale` (1000: seconds to ms), and their count.
    Linear interpolation between the closest ranks (numpy's default)."""
    import numpy as np
    if len(values) == 0:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None, "count": 0}
    scaled = np.asarray(values, dtype=np.float64) * scale
    p50, p95, p99 = np.percentile(scaled, [50, 95, 99])
    return {"p50": round(float(p50), digits), "p95": round(float(p95), digits),
            "p99": round(float(p99), digits), "max": round(float(scaled.max()), digits),
            "mean": round(statistics.fmean(scaled.tolist()), digits), "count": int(scaled.size)}


def ratio(value, reference, digits: int = 3) -> float | None:
    """value / reference, or None when either is missing or zero."""
    return round(value / reference, digits) if value and reference else None


def print_summary(summary: dict, *, sort_keys: bool = False) -> None:
    """Prints the benchmark's one JSON object as the last stdout line, with the wall time of the
    whole run and the 1-minute load average."""
    summary["wall_s"] = round(time.perf_counter() - STARTED, 1)
    summary["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary, sort_keys=sort_keys), flush=True)


def skip(reason: str) -> int:
    """A benchmark that cannot run here (its data set is absent) says so in its JSON line."""
    progress(f"skipped: {reason}")
    print(json.dumps({"benchmark": SCRIPT, "skipped": True, "reason": reason}), flush=True)
    return 0


# ---------------------------------------------------------------------------- data

def beauty_dir() -> Path:
    from scripts import datasets
    return datasets.beauty_dir()


def bench_catalog(spec: str):
    """`beauty` or `synthetic:N[:users][:long]` -> (Dataset, stand-in text vectors): the catalog the
    features stand-in serves (tests/fakes.stand_in_catalog; imported here lazily, it loads torch)."""
    from tests.fakes import stand_in_catalog
    return stand_in_catalog(spec)


def title_vectors(item_ids: list[str], titles: list[str]):
    """MiniLM vectors of the titles, from the on-disk cache (.cache/), encoded on a miss."""
    from services.common.text_encoder import MINILM_MODEL_NAME, TextEncoder
    from scripts.datasets import cached_text_embeddings

    def encode(texts: list[str]):
        progress(f"encoding {len(texts)} titles with MiniLM (cached afterwards)")
        return TextEncoder().encode(texts, batch_size=128, fallback_keys=[f"item:{i}" for i in item_ids])

    return cached_text_embeddings(titles, CACHE_DIR, MINILM_MODEL_NAME, encode)


def catalog_messages(items) -> list:
    """Data-set items (scripts.datasets.CatalogItem) as the collector's Item messages."""
    from deltarec.v1 import common_pb2
    return [common_pb2.Item(item_id=item.item_id, title=item.title or item.item_id, category=item.category,
                            brand=item.brand, active=True) for item in items]


# ---------------------------------------------------------------------------- the pipeline

def upsert_catalog(collector, items: list, batch: int = 500) -> None:
    """UpsertItems in batches through a collector stub (as `make run` loads a catalog); a rejected
    item stops the benchmark."""
    from deltarec.v1 import collector_pb2
    for start in range(0, len(items), batch):
        response = collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=items[start:start + batch]),
                                         timeout=120)
        if response.rejected:
            reasons = [r.reason for r in response.results if not r.ok][:3]
            raise RuntimeError(f"collector rejected items: {reasons}")


def embeddings_computed(features) -> int:
    from deltarec.v1 import features_pb2
    return features.Status(features_pb2.FeaturesServiceStatusRequest(), timeout=30).embeddings_computed


def wait_embedded(features, count: int, timeout_s: float = 300.0, interval_s: float = 0.25) -> float:
    """Polls the features service's Status until it has embedded `count` items; returns the
    time.perf_counter() at which it saw that. Each Status call costs the service a little CPU:
    4 a second keeps that well under 1%."""
    from tests.support import wait_until
    wait_until(lambda: embeddings_computed(features) >= count, f"the features service to embed {count} items",
               timeout_s, interval_s)
    return time.perf_counter()


# ---------------------------------------------------------------------------- infrastructure

class _Infrastructure:
    """Postgres and etcd through scripts/infra: starts what is not running yet, stops only that."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.started_postgres = self.started_etcd = False

    def start(self) -> infra.InfraEnv:
        pg_running = etcd_running = False
        port_file = self.state_dir / "pg.port"
        if port_file.exists():
            _, sockdir = infra._pg_paths(self.state_dir)
            pg_running = infra._pg_ready(infra.postgres_bin_dir(), sockdir, int(port_file.read_text()))
        pid_file, etcd_port = self.state_dir / "etcd.pid", self.state_dir / "etcd.port"
        if pid_file.exists() and etcd_port.exists():
            etcd_running = (infra._pid_alive(int(pid_file.read_text()))
                            and infra._etcd_healthy(int(etcd_port.read_text())))
        try:
            env = infra.start(self.state_dir)
        finally:
            # Also when start() failed half way: stop what it did start.
            self.started_postgres, self.started_etcd = not pg_running, not etcd_running
        progress(f"postgres {'started' if self.started_postgres else 'reused'}, "
                 f"etcd {'started' if self.started_etcd else 'reused'} ({self.state_dir})")
        return env

    def stop(self) -> None:
        if self.started_etcd:
            infra.stop_etcd(self.state_dir)
        if self.started_postgres:
            infra.stop_postgres(self.state_dir)
        if self.started_etcd or self.started_postgres:
            progress("infrastructure stopped")


class Suite:
    """What one benchmark run starts, and stops at the end (a context manager)."""

    def __init__(self, name: str, infra_dir: Path = INFRA_DIR) -> None:
        self.name = name
        self.run_id = uuid.uuid4().hex[:8]
        self.infra_dir = Path(infra_dir).resolve()
        self.work_dir = RUN_DIR / f"bench-{name.replace('_', '-')}"
        self.logs = self.work_dir / "logs"
        self.etcd_prefix = f"/bench-{name.replace('_', '-')}-{self.run_id}/"
        self.env: infra.InfraEnv | None = None
        self._infrastructure = _Infrastructure(self.infra_dir)
        self._database: str | None = None
        self._processes: list[ServiceProcess] = []
        self._closing: list = []          # etcd clients, connections: closed at the end
        self._etcd_clients: list = []
        self._temp_dirs: list[Path] = []

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> "Suite":
        try:
            self.env = self._infrastructure.start()
        except BaseException:
            self._infrastructure.stop()
            raise
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stops and removes what the run started or made, newest first."""
        for process in reversed(self._processes):
            try:
                process.stop(timeout_s=30)
            except Exception as error:  # noqa: BLE001 - stop the rest anyway
                progress(f"could not stop {process.name}: {error}")
        self._processes.clear()
        if self._etcd_clients:
            try:   # the run's keys (model/current, registrations): under its own prefix
                for kv in self._etcd_clients[0].get_prefix(""):
                    self._etcd_clients[0].delete(kv.key)
            except Exception as error:  # noqa: BLE001
                progress(f"could not delete the etcd keys under {self.etcd_prefix}: {error}")
        for resource in reversed(self._closing):
            try:
                resource.close()
            except Exception:  # noqa: BLE001 - closing a client of something already gone
                pass
        self._closing.clear()
        if self._database is not None:
            try:
                infra.drop_database(self.env, self._database)
            except Exception as error:  # noqa: BLE001
                progress(f"could not drop database {self._database}: {error}")
            self._database = None
        for directory in self._temp_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self._infrastructure.stop()

    # ------------------------------------------------------------------ Postgres and etcd
    @property
    def database_url(self) -> str:
        """A fresh database of this run, migrated (made on first use, dropped with its
        replication slots at the end)."""
        if self._database is None:
            name = f"bench_{self.name}_{self.run_id}"
            infra.create_database(self.env, name)
            self._database = name
            progress(f"database {name}")
        return self.env.database_url.rsplit("/", 1)[0] + f"/{self._database}"

    @property
    def dsn(self) -> str:
        """The libpq DSN of the run's database (psycopg2)."""
        from services.collector.cdc.slots import libpq_dsn
        return libpq_dsn(self.database_url, application_name=f"bench-{self.name}")

    def connect(self, *, autocommit: bool = False):
        """A psycopg2 connection to the run's database, closed at the end."""
        import psycopg2
        connection = psycopg2.connect(self.dsn)
        connection.autocommit = autocommit
        self._closing.append(connection)
        return connection

    def etcd(self):
        """An etcd client under the run's own prefix, closed at the end."""
        from services.common.etcd import Etcd
        client = Etcd(self.env.etcd_endpoint, self.etcd_prefix)
        self._closing.append(client)
        self._etcd_clients.append(client)
        return client

    def artifact_store(self):
        """A file artifact store in a temporary directory, removed at the end."""
        from services.common.artifacts import ArtifactStore
        directory = Path(tempfile.mkdtemp(prefix="artifacts-", dir=self.work_dir))
        self._temp_dirs.append(directory)
        return ArtifactStore(directory.as_uri())

    # ------------------------------------------------------------------ processes
    def service_env(self, *, database: bool = True, **extra: str) -> dict[str, str]:
        """The environment of a service of this run: its database (unless database=False: the
        default database of the cluster), etcd prefix, free ports, WARNING logs, a short grace."""
        url = self.database_url if database else self.env.database_url
        return {"DATABASE_URL": url, "ETCD_ENDPOINT": self.env.etcd_endpoint, "ETCD_PREFIX": self.etcd_prefix,
                "GRPC_PORT": "0", "METRICS_PORT": "0", "LOG_LEVEL": "WARNING", "SHUTDOWN_GRACE_S": "1",
                **{key: str(value) for key, value in extra.items()}}

    def start(self, module: str, env: dict[str, str], name: str | None = None,
              timeout_s: float = 120.0) -> ServiceProcess:
        """`python -m module` with `env` (a service: `services.<name>`), stopped at the end."""
        process = ServiceProcess(module, env, name=name, log_dir=self.logs)
        self._processes.append(process)
        process.start(timeout_s)
        return process

    def start_collector(self, *, name: str = "collector", timeout_s: float = 120.0,
                        **env: str) -> ServiceProcess:
        process = self.start("services.collector", self.service_env(**env), name=name, timeout_s=timeout_s)
        progress(f"{name} on {process.address}")
        return process

    def start_features(self, collector: ServiceProcess, *, name: str = "features", timeout_s: float = 300.0,
                       **env: str) -> ServiceProcess:
        process = self.start("services.features",
                             self.service_env(COLLECTOR_ADDRESS=collector.address, **env),
                             name=name, timeout_s=timeout_s)
        progress(f"{name} on {process.address}")
        return process

    def start_ranker(self, features_address: str, replica_id: str, *, name: str | None = None,
                     database: bool = True, timeout_s: float = 600.0, **env: str) -> ServiceProcess:
        process = self.start("services.ranker", self.service_env(
            database=database, FEATURES_ADDRESS=features_address, RANKER_REPLICA_ID=replica_id, **env),
            name=name or f"ranker-{replica_id}", timeout_s=timeout_s)
        progress(f"ranker {replica_id} on {process.address}")
        return process

    def stop(self, process: ServiceProcess, timeout_s: float = 30.0) -> None:
        """Stops a process before the end of the run (to free its memory for the next part)."""
        process.stop(timeout_s=timeout_s)
        if process in self._processes:
            self._processes.remove(process)

    def start_script(self, script: str, env: dict[str, str], name: str | None = None,
                     timeout_s: float = 120.0) -> ServiceProcess:
        """A process of a bench/ script (`python -m <script>` with bench/ on its path only, so
        that it can `import _harness`), e.g. a benchmark's own reference server."""
        path = os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")]))
        return self.start(script, {**env, "PYTHONPATH": path}, name=name or script, timeout_s=timeout_s)

    def start_features_stand_in(self, catalog: str, *, name: str | None = None,
                                timeout_s: float = 300) -> ServiceProcess:
        """tests/fakes.FeaturesStandIn over `bench_catalog(catalog)`, as a process of its own
        (`python -m tests.fakes`)."""
        return self.start("tests.fakes", {"STAND_IN_CATALOG": catalog},
                          name=name or f"features-stand-in-{catalog.replace(':', '-')}", timeout_s=timeout_s)


def vector_movement(parent: tuple, child: tuple) -> dict:
    """How far an update moved the item vectors: ||child - parent|| / ||parent|| per item both
    versions have (the ranker's graph reuse on a swap depends on it: README "Scale").
    `parent`, `child`: (item ids, vectors [n, dim])."""
    import numpy as np

    parent_ids, parent_vectors = parent
    child_ids, child_vectors = child
    if parent_vectors is None or child_vectors is None:
        return {}
    position = {item_id: n for n, item_id in enumerate(parent_ids)}
    pairs = [(position[item_id], n) for n, item_id in enumerate(child_ids) if item_id in position]
    if not pairs:
        return {}
    old_rows, new_rows = (np.array(side, np.int64) for side in zip(*pairs))
    before, after = parent_vectors[old_rows], child_vectors[new_rows]
    relative = np.linalg.norm(after - before, axis=1) / np.maximum(np.linalg.norm(before, axis=1), 1e-12)
    return {"items": int(relative.size), "median": round(float(np.median(relative)), 5),
            "p90": round(float(np.quantile(relative, 0.9)), 5), "max": round(float(relative.max()), 5)}
