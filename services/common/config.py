"""Configuration from environment variables, validated once at start.

Each service declares a frozen dataclass whose fields carry `env(...)` metadata;
`load(ConfigClass)` reads, converts and checks every field and raises ConfigError
naming the variable and what is wrong, so a bad deployment fails at start with
one clear line instead of at the first request.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def env(name: str, default: Any = dataclasses.MISSING, *, help: str = "",
        minimum: float | None = None, maximum: float | None = None,
        choices: tuple | None = None, pattern: str | None = None) -> Any:
    """A dataclass field read from environment variable `name`."""
    meta = {"env": name, "help": help, "minimum": minimum, "maximum": maximum,
            "choices": choices, "pattern": pattern}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _convert(raw: str, kind: Any, name: str) -> Any:
    kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    try:
        if kind_name in ("int",):
            return int(raw)
        if kind_name in ("float",):
            value = float(raw)
            if value != value:  # NaN: every bound check would pass it
                raise ValueError
            return value
        if kind_name in ("bool",):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        return raw
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected {kind_name}") from None


def load(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        meta = field.metadata
        name = meta.get("env")
        if not name:
            continue
        if name in environ:
            value = _convert(environ[name], field.type, name)
        elif field.default is not dataclasses.MISSING:
            value = field.default
        else:
            raise ConfigError(f"{name} is required ({meta.get('help') or field.name})")
        _check(name, value, meta)
        values[field.name] = value
    return cls(**values)


def _check(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise ConfigError(f"{name}={value!r}: must be >= {meta['minimum']}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        raise ConfigError(f"{name}={value!r}: must be <= {meta['maximum']}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name}={value!r}: must be one of {', '.join(map(str, meta['choices']))}")
    if meta.get("pattern") and not re.fullmatch(meta["pattern"], str(value)):
        raise ConfigError(f"{name}={value!r}: must match {meta['pattern']}")


HOST_PORT = r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}"


@dataclasses.dataclass(frozen=True)
class CommonConfig:
    """Settings every service shares; services embed these fields in their own config."""
    database_url: str = env("DATABASE_URL", help="SQLAlchemy URL of the Postgres database")
    etcd_endpoint: str = env("ETCD_ENDPOINT", "127.0.0.1:2379", pattern=HOST_PORT,
                             help="host:port of an etcd member")
    etcd_prefix: str = env("ETCD_PREFIX", "/deltarec/", pattern=r"/.*/",
                           help="key prefix of every DeltaRec key")
    bind_host: str = env("BIND_HOST", "127.0.0.1",
                         help="address the gRPC and metrics ports listen on (0.0.0.0 in a pod)")
    grpc_port: int = env("GRPC_PORT", 0, minimum=0, maximum=65535, help="0 = pick a free port")
    metrics_port: int = env("METRICS_PORT", 0, minimum=0, maximum=65535,
                            help="Prometheus HTTP port; 0 = pick a free port")
    grpc_workers: int = env("GRPC_WORKERS", 16, minimum=1, maximum=1024)
    shutdown_grace_s: float = env("SHUTDOWN_GRACE_S", 10.0, minimum=0.0, maximum=600.0)
    log_level: str = env("LOG_LEVEL", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    stall_after_s: float = env("STALL_AFTER_S", 15.0, minimum=1.0, maximum=3600.0,
                               help="health turns NOT_SERVING once a service cannot make progress this long")


def describe(cls: type) -> list[tuple[str, str, str]]:
    """(variable, default, help) rows, for --help output and the README."""
    rows = []
    for field in dataclasses.fields(cls):
        if "env" in field.metadata:
            default = "" if field.default is dataclasses.MISSING else repr(field.default)
            rows.append((field.metadata["env"], default, field.metadata.get("help", "")))
    return rows


Factory = Callable[[], Any]
