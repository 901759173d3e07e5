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
        raw = _raw_value(name, environ)
        if raw is not None:
            value = _convert(raw, field.type, name)
        elif field.default is not dataclasses.MISSING:
            value = field.default
        else:
            raise ConfigError(f"{name} is required ({meta.get('help') or field.name})")
        _check(name, value, meta)
        values[field.name] = value
    return cls(**values)


def _raw_value(name: str, environ: Mapping[str, str]) -> str | None:
    """The variable's value, or the contents of the file `<name>_FILE` names: secrets (a
    database URL with its password) are mounted as files rather than put in the environment."""
    path = environ.get(f"{name}_FILE")
    if path is None:
        return environ.get(name)
    if name in environ:
        raise ConfigError(f"{name} and {name}_FILE are both set: set one")
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip()
    except OSError as error:
        raise ConfigError(f"{name}_FILE={path!r}: cannot read ({error.strerror})") from None


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
# A gRPC client target (services/common/channels.py): host:port, dns:///name:port (every address of
# a name, e.g. a headless Service) or ipv4:/ipv6: address lists; comma-separated alternatives.
_ONE_TARGET = rf"(dns:///{HOST_PORT}|ipv[46]:{HOST_PORT}(,{HOST_PORT})*|{HOST_PORT})"
GRPC_TARGET = rf"{_ONE_TARGET}(,{_ONE_TARGET})*"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecurityConfig:
    """TLS, authentication and message limits: every server and every internal client reads these
    (services/common/tls.py, auth.py, channels.py, limits.py; the README's Security section).
    Empty = off: plaintext without authentication is the default, for local runs only."""
    tls_cert_file: str = env("TLS_CERT_FILE", "", help="PEM certificate chain this process serves "
                             "(and presents as a client certificate to the services it calls)")
    tls_key_file: str = env("TLS_KEY_FILE", "", help="PEM private key of TLS_CERT_FILE")
    tls_client_ca_file: str = env("TLS_CLIENT_CA_FILE", "", help="PEM CA bundle: when set, the "
                                  "server requires a client certificate signed by it (mutual TLS)")
    tls_ca_file: str = env("TLS_CA_FILE", "", help="PEM CA bundle the internal clients verify servers "
                           "with; when set, every internal client connects over TLS")
    tls_server_name: str = env("TLS_SERVER_NAME", "", pattern=r"[A-Za-z0-9.\-]{0,253}",
                               help="name internal clients expect in server certificates "
                                    "(default: the host of the address dialled)")
    auth_enabled: bool = env("AUTH_ENABLED", False, help="check every call's credentials against "
                             "the role table (services/common/auth.py); health stays open")
    auth_tokens: str = env("AUTH_TOKENS", "", help="bearer tokens, comma-separated role:name:token")
    auth_tokens_file: str = env("AUTH_TOKENS_FILE", "", help="bearer tokens, one role:name:token "
                                "a line (# comments); re-read when the file changes")
    auth_identities: str = env("AUTH_IDENTITIES", "", help="mTLS identities, comma-separated "
                               "identity=role (identity: a certificate SAN or subject CN)")
    auth_client_token: str = env("AUTH_CLIENT_TOKEN", "", help="bearer token the internal clients send")
    auth_client_token_file: str = env("AUTH_CLIENT_TOKEN_FILE", "", help="file holding the token the "
                                      "internal clients send; re-read when it changes")
    reflection_access: str = env("REFLECTION_ACCESS", "open",
                                 choices=("open", "authenticated", "operator", "off"),
                                 help="who may use server reflection (grpcurl list/describe)")
    grpc_max_receive_bytes: int = env("GRPC_MAX_RECEIVE_BYTES", 0, minimum=0, maximum=2**31 - 1,
                                      help="largest request this server accepts; 0 = the "
                                           "service's deliberate default (README limits table)")
    grpc_max_send_bytes: int = env("GRPC_MAX_SEND_BYTES", 0, minimum=0, maximum=2**31 - 1,
                                   help="largest response this server sends; 0 = the service's default")
    grpc_max_metadata_bytes: int = env("GRPC_MAX_METADATA_BYTES", 16384, minimum=1024,
                                       maximum=1 << 20, help="largest header/trailer block, "
                                                             "servers and clients")
    metrics_tls: str = env("METRICS_TLS", "auto", choices=("auto", "off"),
                           help="auto: the metrics endpoint serves TLS_CERT_FILE over HTTPS whenever "
                                "it is set; off: plaintext HTTP regardless (TLS terminated in front)")
    metrics_client_ca_file: str = env("METRICS_CLIENT_CA_FILE", "", help="PEM CA bundle: when set, a "
                                      "scrape must present a client certificate signed by it")
    metrics_bearer_token_file: str = env("METRICS_BEARER_TOKEN_FILE", "", help="tokens, one a line: when "
                                         "set, a scrape must send Authorization: Bearer <one of them>; "
                                         "re-read when the file changes")

    def __post_init__(self) -> None:
        # Cross-field checks; the token/identity syntax is checked by the module that owns it.
        from services.common import auth, metrics_http, tls
        tls.check_config(self)
        auth.check_config(self)
        metrics_http.check_config(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EtcdConfig:
    """How every etcd client of the suite reaches etcd (services/common/etcd.py `Etcd.from_config`,
    the one place a client is made from settings). Empty TLS/user = plaintext without etcd auth,
    for local runs only."""
    etcd_endpoint: str = env("ETCD_ENDPOINT", "127.0.0.1:2379", pattern=HOST_PORT,
                             help="host:port of an etcd member")
    etcd_prefix: str = env("ETCD_PREFIX", "/deltarec/", pattern=r"/.*/",
                           help="key prefix of every DeltaRec key")
    etcd_ca_file: str = env("ETCD_CA_FILE", "", help="PEM CA bundle etcd's server certificate is "
                            "verified with; when set the etcd client connects over TLS")
    etcd_cert_file: str = env("ETCD_CERT_FILE", "", help="PEM client certificate presented to etcd "
                              "(etcd --client-cert-auth); reloaded when the files change")
    etcd_key_file: str = env("ETCD_KEY_FILE", "", help="PEM private key of ETCD_CERT_FILE")
    etcd_server_name: str = env("ETCD_SERVER_NAME", "", pattern=r"[A-Za-z0-9.\-]{0,253}",
                                help="name expected in etcd's certificate (default: the endpoint's host)")
    etcd_user: str = env("ETCD_USER", "", pattern=r"[A-Za-z0-9._@\-]{0,128}",
                         help="etcd user (etcd auth enabled); needs ETCD_PASSWORD")
    etcd_password: str = env("ETCD_PASSWORD", "", help="password of ETCD_USER (ETCD_PASSWORD_FILE: "
                             "from a file, e.g. a Secret volume)")

    def __post_init__(self) -> None:
        from services.common import etcd
        etcd.check_config(self)


@dataclasses.dataclass(frozen=True)
class CommonConfig(SecurityConfig, EtcdConfig):
    """Settings every service shares; services embed these fields in their own config."""
    database_url: str = env("DATABASE_URL", help="SQLAlchemy URL of the Postgres database")
    bind_host: str = env("BIND_HOST", "127.0.0.1",
                         help="address the gRPC and metrics ports listen on (0.0.0.0 in a pod)")
    grpc_port: int = env("GRPC_PORT", 0, minimum=0, maximum=65535, help="0 = pick a free port")
    metrics_port: int = env("METRICS_PORT", 0, minimum=0, maximum=65535,
                            help="Prometheus HTTP port; 0 = pick a free port")
    health_port: int = env("HEALTH_PORT", -1, minimum=-1, maximum=65535,
                           help="an extra plaintext gRPC port serving only grpc.health.v1 (for "
                                "kubelet's gRPC probes, which speak no TLS); -1 = none, 0 = a free port")
    grpc_workers: int = env("GRPC_WORKERS", 16, minimum=1, maximum=1024)
    grpc_running_handlers: int = env("GRPC_RUNNING_HANDLERS", 0, minimum=0, maximum=1024,
                                     help="handler threads that run at once, apart from those waiting "
                                          "(services/common/handler_pool.py); 0 or >= GRPC_WORKERS = all")
    max_connection_age_s: float = env("GRPC_MAX_CONNECTION_AGE_S", 0.0, minimum=0.0, maximum=86400.0,
                                      help="close client connections after this long (streams in "
                                           "flight finish first) so clients re-resolve and spread "
                                           "over new replicas; 0 = never")
    advertise_host: str = env("ADVERTISE_HOST", "", pattern=r"[A-Za-z0-9.\-:\[\]]*",
                              help="host other parts reach this process at (a pod's IP); "
                                   "default: BIND_HOST, or the host name when that is 0.0.0.0")
    shutdown_grace_s: float = env("SHUTDOWN_GRACE_S", 10.0, minimum=0.0, maximum=600.0)
    log_level: str = env("LOG_LEVEL", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    stall_after_s: float = env("STALL_AFTER_S", 15.0, minimum=1.0, maximum=3600.0,
                               help="health turns NOT_SERVING once a service cannot make progress this long")

    def __post_init__(self) -> None:
        SecurityConfig.__post_init__(self)
        EtcdConfig.__post_init__(self)


def describe(cls: type) -> list[tuple[str, str, str]]:
    """(variable, default, help) rows, for --help output and the README."""
    rows = []
    for field in dataclasses.fields(cls):
        if "env" in field.metadata:
            default = "" if field.default is dataclasses.MISSING else repr(field.default)
            rows.append((field.metadata["env"], default, field.metadata.get("help", "")))
    return rows


Factory = Callable[[], Any]
