"""Start DeltaRec services as child processes and find their ports.

Used by `make run`, the benchmarks and the integration tests alike, so the way a
service is started is exercised everywhere. A service prints
`DELTAREC_READY <name> grpc_port=N metrics_port=M` on stdout once it is healthy.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from services.contracts.ready_line import READY_LINE, ready_fields

REPO_ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess:
    def __init__(self, module: str, env: dict[str, str], name: str | None = None,
                 log_dir: str | Path | None = None) -> None:
        self.module, self.name = module, name or module.rsplit(".", 1)[-1]
        self.env = {**os.environ, **env}
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        # Generated code and the repo are importable even without the venv's .pth file.
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), str(REPO_ROOT / "gen")] + ([self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH") else []))
        self.log_path = Path(log_dir or REPO_ROOT / ".run" / "logs") / f"{self.name}.log"
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.workers = 1        # a ranker with RANKER_WORKERS > 1 says how many in its ready line
        self.worker_metrics_ports: list[int] = []   # ... and each worker's metrics port
        self._ready = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> "ServiceProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self._ready.clear()
        self.process = subprocess.Popen([sys.executable, "-m", self.module], env=self.env, cwd=REPO_ROOT,
                                        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        threading.Thread(target=self._read_stdout, args=(self.process, log), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.1):
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; log: {self.log_path}\n"
                                   + self.tail_log())
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s; log: {self.log_path}\n"
                                   + self.tail_log())
        return self

    def _read_stdout(self, process: subprocess.Popen, log) -> None:
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            match = READY_LINE.search(line)
            if match:
                self.port = int(match.group(2))
                self.metrics_port = None if match.group(3) == "None" else int(match.group(3))
                fields = ready_fields(line)
                self.workers = int(fields.get("workers", 1))
                self.worker_metrics_ports = [int(p) for p in fields.get("worker_metrics_ports", "").split(",")
                                             if p.isdigit()]
                self._ready.set()
            log.write(raw)
            log.flush()

    def tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.process.send_signal(signum)

    def kill(self) -> None:
        """kill -9: no chance to clean up, as in a crash."""
        if self.alive():
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait for the graceful shutdown."""
        if not self.alive():
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode
