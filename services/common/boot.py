"""The one boot path of every service's `__main__`: what each service does before and after
its own wiring, written once.

How a `__main__.py` uses it (it only composes; behaviour lives in the service's modules):

    from services.common.boot import Boot

    def main() -> int:
        boot = Boot.load("collector", CollectorConfig)   # config from the environment: a bad
                                                         # value prints one line, exit code 2;
                                                         # then JSON logs at LOG_LEVEL
        engine = boot.database(pool_size=16)             # migrations to head, then the engine
        etcd = boot.etcd()                               # the etcd wrapper (ETCD_ENDPOINT/PREFIX)
        service = boot.grpc_service(collector_pb2, "CollectorService")   # health, reflection,
                                                         # metrics, graceful shutdown
        ... build the service's parts, add its servicer to service.server,
        ... service.on_shutdown(part.stop) for each part that needs stopping
        return boot.run(ready_check=None)                # blocks until SIGTERM/SIGINT

* `boot.config_error("FIELD: why")` stops the process the same way as a bad variable (for checks
  `load` cannot express, e.g. a required address or an artifact URI the store refuses).
* `boot.instance_id(config.replica_id)` is the configured id or `<host>-<pid>`.
* Resources made by `database()` and `etcd()` are closed by `run()` after the service's own
  shutdown hooks (which may still need them), newest first.
* `run(exit_at_once=True)` ends the process right after the shutdown hooks, without waiting for
  worker threads (the trainer: a training in progress is crash-safe and must not hold the exit).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Callable, Generic, TypeVar

from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError

from services.common import db, gc_pauses, logs
from services.common.config import ConfigError, load
from services.common.etcd import Etcd
from services.common.server import GrpcService, run_service

T = TypeVar("T")

EXIT_CONFIG_ERROR = 2


class Boot(Generic[T]):
    def __init__(self, name: str, config: T) -> None:
        self.name, self.config = name, config
        self.service: GrpcService | None = None
        self._closers: list[Callable[[], None]] = []

    @classmethod
    def load(cls, name: str, config_class: type[T], *, check: Callable[[T], None] | None = None) -> "Boot[T]":
        """Reads `config_class` from the environment (and runs `check`, which may raise
        ConfigError); on a bad value prints `<name>: configuration error: ...` to stderr and
        exits with status 2. Then sets up the JSON logs."""
        try:
            config = load(config_class)
            _check_database_url(config)
            if check is not None:
                check(config)
        except ConfigError as error:
            _exit_config_error(name, str(error))
        logs.setup(name, config.log_level)
        gc_pauses.install()
        return cls(name, config)

    def config_error(self, message: str) -> None:
        """Stops the process like a bad environment variable does (status 2, one line)."""
        _exit_config_error(self.name, message)

    def instance_id(self, configured: str = "") -> str:
        return configured or f"{socket.gethostname()}-{os.getpid()}"

    def database(self, *, pool_size: int) -> Engine:
        """Migrates the schema to head (idempotent, serialised across services), then the pooled
        engine, disposed at shutdown."""
        db.migrate(self.config.database_url)
        engine = db.make_engine(self.config.database_url, pool_size=pool_size,
                                application_name=f"deltarec-{self.name}")
        self._closers.append(engine.dispose)
        return engine

    def etcd(self) -> Etcd:
        etcd = Etcd.from_config(self.config)
        self._closers.append(etcd.close)
        return etcd

    def grpc_service(self, pb2_module, service_name: str) -> GrpcService:
        """The server for `<package>.<service_name>` of `pb2_module` (e.g. collector_pb2,
        "CollectorService"), from the common settings (ports, workers, grace, host)."""
        full_name = pb2_module.DESCRIPTOR.services_by_name[service_name].full_name
        self.service = GrpcService.from_config(self.name, [full_name], self.config)
        return self.service

    def run(self, ready_check: Callable[[], None] | None = None, *, exit_at_once: bool = False) -> int:
        """Serves until a signal stops the service: ready (health SERVING and the DELTAREC_READY
        line) once `ready_check` returned; on shutdown, the service's hooks, then the resources
        made here. Returns the exit status."""
        service = self.service
        if service is None:
            raise RuntimeError("grpc_service() was not called")
        for close in reversed(self._closers):
            service.on_shutdown(close)
        run_service(service, ready_check)
        if exit_at_once:
            logging.shutdown()
            sys.stdout.flush()
            os._exit(0)
        return 0


def _check_database_url(config) -> None:
    url = getattr(config, "database_url", None)
    if url is None:
        return
    try:
        make_url(url)
    except ArgumentError:
        raise ConfigError("DATABASE_URL: not a SQLAlchemy database URL "
                          "(postgresql+psycopg2://user@host:port/database)") from None


def _exit_config_error(name: str, message: str) -> None:
    print(f"{name}: configuration error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG_ERROR)
