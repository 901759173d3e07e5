"""Readiness that follows the service's ability to make progress.

A process that is up but cannot do its job (its delta consumer cannot apply, its store is
unreachable) must say so in its health, so that Kubernetes (readiness probe = gRPC health) and
load balancers act, and must say SERVING again by itself once it can. `Readiness` polls named
checks — callables returning None when fine, or a short reason — and sets the service's health
NOT_SERVING while any check has a reason, SERVING when none has; transitions are logged (WARNING
going down, INFO coming back) and exported as `deltarec_ready` / `deltarec_not_ready_total`.

    readiness = Readiness(service).add("delta stream", consumer.progress_problem)
    run_service(service, ready_check=readiness.start)
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import sqlalchemy as sa
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

READY = Gauge("deltarec_ready", "1 while every readiness check of this service passes")
NOT_READY = Counter("deltarec_not_ready_total", "Times a readiness check turned the service NOT_SERVING",
                    ["check"])

Check = Callable[[], "str | None"]


class Readiness:
    def __init__(self, service, interval_s: float = 1.0) -> None:
        self.service, self.interval_s = service, interval_s
        self.checks: list[tuple[str, Check]] = []
        self.problems: dict[str, str] = {}
        self._serving = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, check: Check) -> "Readiness":
        self.checks.append((name, check))
        return self

    def start(self) -> "Readiness":
        """Call once the service is up (e.g. as run_service's ready_check); polls from then on."""
        READY.set(1)
        self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)
        self._thread.start()
        self.service.on_shutdown(self.stop)
        return self

    def stop(self) -> None:
        self._stop.set()

    def evaluate(self) -> dict[str, str]:
        problems = {}
        for name, check in self.checks:
            try:
                reason = check()
            except Exception as error:  # noqa: BLE001 - a failing check is a reason
                reason = f"check failed: {type(error).__name__}: {str(error)[:150]}"
            if reason:
                problems[name] = reason
        return problems

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            problems = self.evaluate()
            self.problems = problems
            if self._stop.is_set() or self.service._stopped.is_set():
                return      # shutting down: health stays NOT_SERVING
            if problems and self._serving:
                self._serving = False
                READY.set(0)
                for name in problems:
                    NOT_READY.labels(name).inc()
                log.warning("not ready: cannot make progress", extra={"problems": problems})
                self.service.set_ready(False)
            elif not problems and not self._serving:
                self._serving = True
                READY.set(1)
                log.info("ready again")
                self.service.set_ready(True)


def store_reachable(engine, timeout_s: float = 2.0) -> Check:
    """A check that the database answers (one `SELECT 1`, at most every poll)."""
    def check() -> str | None:
        try:
            with engine.connect() as connection:
                connection.execute(sa.text(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}"))
                connection.execute(sa.text("SELECT 1"))
            return None
        except Exception as error:  # noqa: BLE001
            return f"database unreachable ({type(error).__name__})"
    return check
