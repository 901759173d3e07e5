"""The supervisor of a replica's worker processes (RANKER_WORKERS > 1; the pure parts are workers.py).

The supervisor loads no catalog and no model. It reserves the shared port(s) (workers.py
`reserve_shared_port`: a port in use is still an error), then starts each worker as
`python -m services.ranker` with the worker's settings (a new interpreter: never os.fork of a
process whose gRPC, torch or faiss threads exist), and:

- prints its DELTAREC_READY line once every worker printed its own (each worker listens only once
  its catalog caught up and its first model loaded, so a port with a starting worker behind it
  serves from the others and a starting replica refuses connections, as a single process does
  before it binds);
- forwards SIGTERM / SIGINT to every worker (each drains its calls within SHUTDOWN_GRACE_S, health
  NOT_SERVING first) and exits 0 once they are gone (SIGKILL after the grace and a margin);
- restarts a worker that exits unexpectedly, after the RestartPolicy's backoff (logged with the
  exit status); it gives up, stops the others and exits 1 when a worker keeps failing (or exits
  with a configuration error).

A worker whose supervisor is gone (SIGKILL) notices within a second (`watch_supervisor`) and
stops itself the graceful way.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from services.common.boot import Boot
from services.contracts.ready_line import READY_LINE, ready_line
from services.ranker.workers import RestartPolicy, reserve_shared_port, worker_environment

log = logging.getLogger(__name__)

# After the workers' SHUTDOWN_GRACE_S: the rest of their shutdown (hooks, closing connections).
STOP_MARGIN_S = 15.0
POLL_S = 0.2


@dataclass
class WorkerSlot:
    index: int
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0                 # in a row, RestartPolicy.failures_after
    restart_at: float | None = None   # monotonic time of a scheduled restart
    ready: threading.Event = field(default_factory=threading.Event)
    metrics_port: str = "None"


class Supervisor:
    def __init__(self, boot: Boot, *, base_id: str, grpc_port: int, health_port: int,
                 policy: RestartPolicy = RestartPolicy()) -> None:
        self.config, self.base_id = boot.config, base_id
        self.grpc_port, self.health_port, self.policy = grpc_port, health_port, policy
        self.slots = [WorkerSlot(index) for index in range(self.config.workers)]
        self.stopping = threading.Event()

    # ------------------------------------------------------------------ workers
    def start_worker(self, slot: WorkerSlot) -> None:
        config = self.config
        env = {**os.environ, **worker_environment(
            slot.index, config.workers, base_id=self.base_id, grpc_port=self.grpc_port,
            health_port=self.health_port, metrics_port=config.metrics_port,
            worker_grpc_port=config.worker_grpc_port)}
        slot.ready.clear()
        slot.restart_at = None
        slot.started_at = time.monotonic()
        slot.process = subprocess.Popen([sys.executable, "-m", "services.ranker"], env=env,
                                        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        threading.Thread(target=self._read_stdout, args=(slot, slot.process), daemon=True,
                         name=f"worker-{slot.index}-stdout").start()
        log.info("worker started", extra={"worker": slot.index, "pid": slot.process.pid,
                                          "replica_id": env["RANKER_REPLICA_ID"]})

    def _read_stdout(self, slot: WorkerSlot, process: subprocess.Popen) -> None:
        """A worker's stdout: its READY line is noted (not passed on: the supervisor prints the
        replica's own once every worker is ready); other lines (drills' DELTAREC_FAULT) pass."""
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            match = READY_LINE.search(line)
            if match:
                slot.metrics_port = match.group(3)
                slot.ready.set()
                log.info("worker ready", extra={"worker": slot.index, "pid": process.pid,
                                                "metrics_port": slot.metrics_port})
            else:
                sys.stdout.write(line)
                sys.stdout.flush()

    def _exited(self, slot: WorkerSlot, now: float) -> bool:
        """Handles a worker found dead; False: give up."""
        returncode = slot.process.returncode
        ran_s = now - slot.started_at
        slot.failures = self.policy.failures_after(slot.failures, ran_s)
        delay = self.policy.decide(slot.failures, returncode)
        slot.process = None
        if delay is None:
            log.error("worker keeps failing: giving up", extra={
                "worker": slot.index, "returncode": returncode, "ran_s": round(ran_s, 1),
                "failures_in_a_row": slot.failures})
            return False
        slot.restart_at = now + delay
        log.warning("worker exited: restarting it", extra={
            "worker": slot.index, "returncode": returncode, "ran_s": round(ran_s, 1),
            "failures_in_a_row": slot.failures, "restart_in_s": delay})
        return True

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        def forward(signum, _frame):
            log.info("signal: stopping the workers", extra={"signal": signal.Signals(signum).name})
            self.stopping.set()
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        for slot in self.slots:
            self.start_worker(slot)
        announced = False
        status = 0
        while not self.stopping.wait(POLL_S):
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is not None and slot.process.poll() is not None:
                    if not self._exited(slot, now):
                        status = 1
                        self.stopping.set()
                        break
                if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                    self.start_worker(slot)
            if not announced and all(slot.ready.is_set() for slot in self.slots):
                announced = True
                ports = ",".join(slot.metrics_port for slot in self.slots)
                print(ready_line("ranker", self.grpc_port, self.slots[0].metrics_port,
                                 workers=len(self.slots), worker_metrics_ports=ports), flush=True)
        self.stop_workers()
        log.info("stopped", extra={"status": status})
        return status

    def stop_workers(self) -> None:
        live = [slot.process for slot in self.slots if slot.process is not None and slot.process.poll() is None]
        for process in live:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace_s + STOP_MARGIN_S
        for process in live:
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("worker did not stop in time: killed", extra={"pid": process.pid})
                process.kill()
                process.wait(10)


def supervise(boot: Boot) -> int:
    """The supervisor's main: reserve the shared ports, run the workers; the exit status."""
    config = boot.config
    holders = []
    try:
        holders.append(reserve_shared_port(config.bind_host, config.grpc_port))
        if config.health_port >= 0:
            holders.append(reserve_shared_port(config.bind_host, config.health_port))
    except OSError as error:
        log.error(str(error.strerror or error))
        for holder in holders:
            holder.close()
        return 1
    grpc_port = holders[0].getsockname()[1]
    health_port = holders[1].getsockname()[1] if len(holders) > 1 else -1
    base_id = boot.instance_id(config.replica_id)
    log.info("supervising workers", extra={"workers": config.workers, "grpc_port": grpc_port,
                                           "health_port": health_port, "replica_id": base_id})
    try:
        return Supervisor(boot, base_id=base_id, grpc_port=grpc_port, health_port=health_port).run()
    finally:
        for holder in holders:
            holder.close()


def watch_supervisor(interval_s: float = 1.0) -> None:
    """In a worker: SIGTERM to itself (the graceful stop) once its parent, the supervisor, is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        log.warning("supervisor gone: stopping", extra={"supervisor_pid": parent})
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="watch-supervisor", daemon=True).start()
