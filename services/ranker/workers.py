"""Several ranker processes per replica (`RANKER_WORKERS` > 1): the pure parts — what each worker
is called and listens on, the environment it is started with, and when a dead one is restarted.
The process handling itself is supervisor.py.

Why: one Python process serialises its handler work on the GIL, so one ranker process cannot use
more than about one core however many handler threads it has (README "Serving"). N worker
processes, each a complete replica (its own catalog, feeds, model watch, user cache and indexes:
N times the memory), serve one port through SO_REUSEPORT; the kernel spreads *connections* (not
requests) over the workers that listen.

Each worker:
- is registered as a replica of its own, `rankers/<base id>-w<index>`, so the consistency
  service checks (and repairs) each worker like any replica;
- also listens on a port of its own (`RANKER_WORKER_GRPC_PORT` + index, or a free port when 0),
  which is the address it registers: a call to the shared port reaches whichever worker the
  kernel picks, a digest or a Reload must reach *that* worker;
- serves its metrics on `METRICS_PORT` + index (a free port each when METRICS_PORT is 0).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

from services.common.config import ConfigError

# The environment the supervisor sets for its workers (a worker reads them as ordinary settings).
WORKER_INDEX_ENV = "RANKER_WORKER_INDEX"
WORKERS_ENV = "RANKER_WORKERS"
REPLICA_ID_ENV = "RANKER_REPLICA_ID"
MAX_REPLICA_ID = 128
MAX_PORT = 65535


def worker_replica_id(base_id: str, index: int) -> str:
    """`<base>-w<index>`: the worker's name under rankers/ in etcd."""
    return f"{base_id}-w{index}"


def offset_port(base_port: int, index: int) -> int:
    """A worker's own port from a configured base: base + index; 0 (pick a free port) stays 0."""
    return base_port + index if base_port > 0 else 0


def check_worker_settings(workers: int, *, replica_id: str, metrics_port: int, worker_grpc_port: int,
                          grpc_port: int, health_port: int) -> None:
    """What `env()` cannot check of the worker settings (raises ConfigError naming the variable)."""
    if workers <= 1:
        return
    suffix = len(worker_replica_id("", workers - 1))
    if len(replica_id) + suffix > MAX_REPLICA_ID:
        raise ConfigError(f"RANKER_REPLICA_ID: at most {MAX_REPLICA_ID - suffix} characters with "
                          f"RANKER_WORKERS={workers} (each worker is named <id>-w<index>)")
    for name, port in (("METRICS_PORT", metrics_port), ("RANKER_WORKER_GRPC_PORT", worker_grpc_port)):
        if port > 0 and port + workers - 1 > MAX_PORT:
            raise ConfigError(f"{name}={port}: workers use {name} + 0..{workers - 1}, beyond {MAX_PORT}")
    own = {offset_port(worker_grpc_port, i) for i in range(workers)} - {0}
    shared = {p for p in (grpc_port, health_port) if p > 0}
    if own & shared:
        raise ConfigError(f"RANKER_WORKER_GRPC_PORT={worker_grpc_port}: the workers' own ports "
                          f"{sorted(own)} overlap GRPC_PORT / HEALTH_PORT {sorted(shared)}")
    if metrics_port > 0 and own & {offset_port(metrics_port, i) for i in range(workers)}:
        raise ConfigError(f"RANKER_WORKER_GRPC_PORT={worker_grpc_port}: the workers' own ports overlap "
                          f"their metrics ports (METRICS_PORT={metrics_port} + index)")


def worker_environment(index: int, workers: int, *, base_id: str, grpc_port: int, health_port: int,
                       metrics_port: int, worker_grpc_port: int) -> dict[str, str]:
    """The settings that make worker `index` of `workers`: the shared ports as reserved by the
    supervisor (real numbers, never 0: every worker must land on the same port), its own id,
    metrics port and own port. Everything else it inherits from the supervisor's environment."""
    env = {WORKERS_ENV: "1", WORKER_INDEX_ENV: str(index), REPLICA_ID_ENV: worker_replica_id(base_id, index),
           "GRPC_PORT": str(grpc_port), "METRICS_PORT": str(offset_port(metrics_port, index)),
           "RANKER_WORKER_GRPC_PORT": str(offset_port(worker_grpc_port, index))}
    if health_port >= 0:
        env["HEALTH_PORT"] = str(health_port)
    return env


# ---------------------------------------------------------------------------- shared ports

def _socket_address(host: str) -> tuple[int, str]:
    host = host.strip("[]")
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), host


def reserve_shared_port(host: str, port: int) -> socket.socket:
    """Reserves `host:port` (0: a free port) for workers that listen on it with SO_REUSEPORT and
    returns the socket holding it (bound, never listening: it gets no connections) — keep it open
    while the workers run.

    First a bind *without* SO_REUSEPORT: it fails when anything listens there already, also
    another ranker's workers (they all set SO_REUSEPORT and would otherwise share the port with
    these silently): the port conflict is detected as it is without workers. Then the holder binds
    it with SO_REUSEPORT (the workers can join; a process without it cannot take the port while a
    worker restarts). Between the two binds (microseconds) another SO_REUSEPORT socket of the same
    user could slip in; nothing else can."""
    family, address = _socket_address(host)
    probe = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR: connections of a ranker that just stopped linger in TIME_WAIT for a minute and
    # would fail a plain bind; a socket listening there still fails it (the conflict looked for),
    # and so does another supervisor's holder (bound without SO_REUSEADDR)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((address, port))
        port = probe.getsockname()[1]
    except OSError as error:
        raise OSError(error.errno, f"could not bind gRPC port {host}:{port} ({error.strerror})") from None
    finally:
        probe.close()
    holder = socket.socket(family, socket.SOCK_STREAM)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((address, port))
    except OSError as error:
        holder.close()
        raise OSError(error.errno, f"could not hold gRPC port {host}:{port} ({error.strerror})") from None
    return holder


# ---------------------------------------------------------------------------- restarts

# A config error does not heal by restarting (boot.EXIT_CONFIG_ERROR).
EXIT_CONFIG_ERROR = 2


@dataclass(frozen=True)
class RestartPolicy:
    """When a worker that exited unexpectedly is started again.

    The n-th failure in a row of one worker waits `first_backoff_s * 2**(n-1)` (at most
    `max_backoff_s`) before the restart; a worker that ran `stable_after_s` before it died starts
    the count again. At the `max_failures`-th failure in a row of one worker, or at once when a worker
    exits with a configuration error (status 2), the supervisor gives up: it stops the other
    workers and exits non-zero, so the orchestrator sees the replica fail instead of a replica
    serving with fewer workers forever."""
    first_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stable_after_s: float = 60.0
    max_failures: int = 5

    def failures_after(self, failures_before: int, ran_s: float) -> int:
        """The failures in a row counted once a worker that ran `ran_s` died."""
        return 1 if ran_s >= self.stable_after_s else failures_before + 1

    def decide(self, failures: int, returncode: int | None) -> float | None:
        """Seconds to wait before the restart, or None: give up."""
        if returncode == EXIT_CONFIG_ERROR or failures >= self.max_failures:
            return None
        return min(self.first_backoff_s * 2 ** (failures - 1), self.max_backoff_s)
