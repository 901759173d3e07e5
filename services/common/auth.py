"""Who may call what: roles, the role of every RPC, and the server interceptor that checks them.

A caller proves who it is with a bearer token (`authorization: Bearer <token>`; tokens come
from AUTH_TOKENS / AUTH_TOKENS_FILE as `role:name:token`) or with its mutual-TLS certificate
(an identity — a subject alternative name or the subject CN — mapped to a role by
AUTH_IDENTITIES). A presented token decides (a wrong one is refused even with a good
certificate); without one the certificate does.

Roles:
  storefront  the shop's backend: ingest, catalog writes, recommend, search
  service     DeltaRec's own parts: the delta stream, internal reads, repairs they make
  operator    people and tools running the suite: everything, including dropping a consumer
              group, training, rolling back and reconciling

`METHOD_ROLES` names the roles of every RPC of every proto by its full method name (operator
is implied everywhere); a test reads the proto descriptors and fails on any RPC missing here,
so a new RPC cannot ship unguarded — and one that is missing anyway is refused (fail closed).
Health is open to everyone (load balancers and probes carry no credentials); reflection
follows REFLECTION_ACCESS. No credentials: UNAUTHENTICATED; a role that may not: PERMISSION_DENIED.
Status messages never contain the presented token.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import re
import threading
import time
from typing import Iterable, Mapping

import grpc
from prometheus_client import Counter

from services.common.config import ConfigError
from services.common.interceptors import wrap_handler

log = logging.getLogger(__name__)

STOREFRONT = "storefront"
SERVICE = "service"
OPERATOR = "operator"
ROLES = (STOREFRONT, SERVICE, OPERATOR)

_STOREFRONT = frozenset({STOREFRONT})
_SERVICE = frozenset({SERVICE})
_OPERATOR = frozenset({OPERATOR})


def _methods(service: str, roles: frozenset[str], *names: str) -> dict[str, frozenset[str]]:
    return {f"/deltarec.v1.{service}/{name}": roles for name in names}


# The one table. Keys are full method names ("/package.Service/Method").
METHOD_ROLES: dict[str, frozenset[str]] = {
    **_methods("CollectorService", _STOREFRONT, "IngestEvents", "StreamEvents", "UpsertItems", "DeleteItems"),
    **_methods("CollectorService", _SERVICE, "Subscribe", "ListConsumerGroups"),
    **_methods("CollectorService", _OPERATOR, "DropConsumerGroup"),
    **_methods("FeaturesService", _SERVICE, "GetUserFeatures", "BatchGetUserFeatures", "GetItemFeatures",
               "EmbedText", "WatchItems", "WatchUsers", "Status"),
    # Repairs (recompute items / users from the source of truth, reload a replica) are operator
    # actions; the consistency service makes them on an operator's Reconcile or by its own repair
    # loop, so its identity holds the operator role (README, Security).
    **_methods("FeaturesService", _OPERATOR, "Resync", "RebuildUsers"),
    **_methods("TrainerService", _OPERATOR, "Train", "Update"),
    **_methods("TrainerService", _SERVICE, "ListVersions", "GetVersion", "Status"),
    **_methods("RankerService", _STOREFRONT, "Recommend", "Search", "SimilarItems"),
    **_methods("RankerService", _SERVICE, "Status", "IndexDigest"),
    **_methods("RankerService", _OPERATOR, "Reload"),
    **_methods("ConsistencyService", _SERVICE, "Check", "History", "OnlineMetrics"),
    **_methods("ConsistencyService", _OPERATOR, "Reconcile", "Rollback"),
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
REFLECTION_METHODS = ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                      "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
REFLECTION_ROLES = {"authenticated": frozenset(ROLES), "operator": _OPERATOR}

DENIED = Counter("deltarec_auth_denied_total", "calls refused by authentication or authorisation",
                 ["method", "reason"])

TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")
TOKEN_RULE = "16-512 characters of A-Z a-z 0-9 . _ ~ + / = -"
NAME_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
TOKEN_FILE_RECHECK_S = 1.0


# ------------------------------------------------------------------------------ parsing settings

@dataclasses.dataclass(frozen=True)
class Token:
    role: str
    name: str
    digest: bytes          # sha256 of the token: compared, never kept or logged in clear


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def parse_tokens(text: str, source: str) -> list[Token]:
    """`role:name:token` entries separated by newlines or commas; `#` starts a comment. Errors
    name the entry's position, never its token."""
    tokens: list[Token] = []
    entries = [part for line in text.splitlines() for part in line.split("#", 1)[0].split(",")]
    for position, entry in enumerate((entry.strip() for entry in entries), 1):
        if not entry:
            continue
        fields = entry.split(":")
        if len(fields) != 3:
            raise ConfigError(f"{source}: entry {position}: expected role:name:token")
        role, name, token = fields
        if role not in ROLES:
            raise ConfigError(f"{source}: entry {position}: role {role[:32]!r} is not one of {', '.join(ROLES)}")
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"{source}: entry {position}: name must match {NAME_PATTERN.pattern}")
        if not TOKEN_PATTERN.fullmatch(token):
            raise ConfigError(f"{source}: entry {position} ({name}): the token must be {TOKEN_RULE}")
        tokens.append(Token(role, name, _digest(token)))
    return tokens


def parse_identities(text: str) -> dict[str, frozenset[str]]:
    """`identity=role` entries, comma-separated; an identity listed twice gets both roles."""
    identities: dict[str, set[str]] = {}
    for position, entry in enumerate((entry.strip() for entry in text.split(",")), 1):
        if not entry:
            continue
        identity, sep, role = entry.rpartition("=")
        if not sep or not identity.strip():
            raise ConfigError(f"AUTH_IDENTITIES: entry {position}: expected identity=role")
        if role.strip() not in ROLES:
            raise ConfigError(f"AUTH_IDENTITIES: entry {position}: role {role[:32]!r} is not one of {', '.join(ROLES)}")
        identities.setdefault(identity.strip(), set()).add(role.strip())
    return {identity: frozenset(roles) for identity, roles in identities.items()}


def _read_text(path: str, variable: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{variable}={path!r}: {getattr(error, 'strerror', None) or error}") from None


def _one_of(inline: str, path: str, variable: str) -> str:
    """X or X_FILE: the file's content when X_FILE is set (and then watched), else X. Both set is
    refused, unless X holds exactly the file's content (a loader that resolves X_FILE into X)."""
    if not path:
        return inline
    content = _read_text(path, f"{variable}_FILE")
    if inline and inline.strip() != content.strip():
        raise ConfigError(f"{variable} and {variable}_FILE: set one")
    return content


def check_config(config) -> None:
    """Cross-field checks of SecurityConfig's AUTH_* settings."""
    tokens = parse_tokens(_one_of(config.auth_tokens, config.auth_tokens_file, "AUTH_TOKENS"),
                          "AUTH_TOKENS_FILE" if config.auth_tokens_file else "AUTH_TOKENS")
    identities = parse_identities(config.auth_identities)
    if identities and not config.tls_client_ca_file:
        raise ConfigError("AUTH_IDENTITIES needs TLS_CLIENT_CA_FILE (identities come from client certificates)")
    if (tokens or config.auth_tokens_file or identities) and not config.auth_enabled:
        raise ConfigError("AUTH_TOKENS / AUTH_TOKENS_FILE / AUTH_IDENTITIES are set but AUTH_ENABLED is "
                          "false: set AUTH_ENABLED=true (or remove them) so nothing looks protected that is not")
    if config.auth_enabled and not (tokens or config.auth_tokens_file or identities):
        raise ConfigError("AUTH_ENABLED=true needs AUTH_TOKENS, AUTH_TOKENS_FILE or AUTH_IDENTITIES")
    if config.reflection_access in REFLECTION_ROLES and not config.auth_enabled:
        raise ConfigError(f"REFLECTION_ACCESS={config.reflection_access} needs AUTH_ENABLED=true")
    _one_of(config.auth_client_token, config.auth_client_token_file, "AUTH_CLIENT_TOKEN")
    if config.auth_client_token_file:
        ClientToken(file=config.auth_client_token_file).value()   # readable and well-formed
    elif config.auth_client_token and not TOKEN_PATTERN.fullmatch(config.auth_client_token):
        raise ConfigError(f"AUTH_CLIENT_TOKEN: must be {TOKEN_RULE}")


# ------------------------------------------------------------------------------ token sources

class _WatchedFile:
    """Re-reads a small file when its stat changes, at most every TOKEN_FILE_RECHECK_S; a file
    that became unreadable or invalid keeps the last good content (and says so once)."""

    def __init__(self, path: str, parse) -> None:
        self.path, self.parse = path, parse
        self._lock = threading.Lock()
        self._checked = 0.0
        self._mark = None
        self._value = self._load(first=True)

    def _stat(self):
        try:
            stat = os.stat(self.path)
            return stat.st_ino, stat.st_size, stat.st_mtime_ns
        except OSError:
            return None

    def _load(self, first: bool = False):
        mark = self._stat()
        try:
            with open(self.path, encoding="utf-8") as handle:
                value = self.parse(handle.read())
        except (OSError, UnicodeDecodeError, ConfigError) as error:
            if first:
                raise ConfigError(f"{self.path}: {getattr(error, 'strerror', None) or error}") from None
            log.warning("credentials file changed but is not usable; keeping the previous content",
                        extra={"path": self.path, "error": str(error)[:200]})
            self._mark = mark
            return self._value
        if not first:
            log.info("credentials file reloaded", extra={"path": self.path})
        self._mark = mark
        return value

    def get(self):
        now = time.monotonic()
        if now - self._checked >= TOKEN_FILE_RECHECK_S:
            with self._lock:
                if now - self._checked >= TOKEN_FILE_RECHECK_S:
                    self._checked = now
                    if self._stat() != self._mark:
                        self._value = self._load()
        return self._value


class ClientToken:
    """The bearer token an internal client sends: AUTH_CLIENT_TOKEN, or AUTH_CLIENT_TOKEN_FILE
    re-read when it changes (a rotated Secret)."""

    def __init__(self, token: str = "", file: str = "") -> None:
        self._token = token
        self._file = _WatchedFile(file, self._parse) if file else None

    @staticmethod
    def _parse(text: str) -> str:
        token = text.strip()
        if not TOKEN_PATTERN.fullmatch(token):
            raise ConfigError(f"AUTH_CLIENT_TOKEN_FILE: the token must be {TOKEN_RULE}")
        return token

    def value(self) -> str:
        return self._file.get() if self._file is not None else self._token

    @classmethod
    def from_config(cls, config) -> "ClientToken | None":
        if config is None or not (config.auth_client_token or config.auth_client_token_file):
            return None
        if config.auth_client_token_file:          # the file wins: it is re-read when rotated
            return cls(file=config.auth_client_token_file)
        return cls(config.auth_client_token)


# ------------------------------------------------------------------------------ deciding

class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason


@dataclasses.dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]
    via: str               # "token" or "certificate"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization` header; "" when the header is not a Bearer one."""
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def certificate_identities(auth_context: Mapping[str, Iterable[bytes]] | None) -> list[str]:
    """The verified peer certificate's SANs and subject CN (empty without mutual TLS)."""
    if not auth_context:
        return []
    names = []
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        for value in auth_context.get(key, ()):
            names.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
    return names


class Authorizer:
    """Pure decision logic: (method, token, certificate identities) -> Principal, or Refused."""

    def __init__(self, tokens: Iterable[Token] = (), identities: Mapping[str, frozenset[str]] | None = None,
                 tokens_file: str = "", method_roles: Mapping[str, frozenset[str]] = METHOD_ROLES,
                 reflection_access: str = "open") -> None:
        self._inline = list(tokens)
        self._file = _WatchedFile(tokens_file, lambda text: parse_tokens(text, "AUTH_TOKENS_FILE")) \
            if tokens_file else None
        self.identities = dict(identities or {})
        self.method_roles = dict(method_roles)
        if reflection_access in REFLECTION_ROLES:
            for method in REFLECTION_METHODS:
                self.method_roles[method] = REFLECTION_ROLES[reflection_access]
        self.open_methods = set(REFLECTION_METHODS) if reflection_access == "open" else set()

    @classmethod
    def from_config(cls, config) -> "Authorizer":
        inline = "" if config.auth_tokens_file else config.auth_tokens   # the file wins (re-read)
        return cls(parse_tokens(inline, "AUTH_TOKENS"), parse_identities(config.auth_identities),
                   tokens_file=config.auth_tokens_file, reflection_access=config.reflection_access)

    def is_open(self, method: str) -> bool:
        return method.startswith(OPEN_PREFIXES) or method in self.open_methods

    def _match_token(self, token: str) -> Token | None:
        digest = _digest(token)
        match = None
        # Every entry is compared (no early exit), each in constant time.
        for candidate in self._inline + (self._file.get() if self._file is not None else []):
            if hmac.compare_digest(digest, candidate.digest) and match is None:
                match = candidate
        return match

    def authenticate(self, token: str | None, identities) -> Principal:
        """`identities`: the certificate's names, or a callable giving them (only asked when no
        token was presented)."""
        if token is not None:
            found = self._match_token(token) if token else None
            if found is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                              "invalid credentials: the bearer token is not known", "bad_token")
            return Principal(found.name, frozenset({found.role}), "token")
        if callable(identities):
            identities = identities()
        if identities:
            roles = frozenset().union(*(self.identities.get(name, frozenset()) for name in identities))
            named = [name for name in identities if name in self.identities]
            # certificate_identities lists the SANs, then the CN: name it by what matched, else the CN.
            return Principal((named or identities[-1:])[0][:128], roles, "certificate")
        raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                      "missing credentials: send 'authorization: Bearer <token>' or a client certificate",
                      "missing")

    def authorize(self, method: str, principal: Principal) -> None:
        allowed = self.method_roles.get(method)
        if allowed is None:
            log.error("RPC missing from the role table: refused", extra={"method": method[:200]})
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "this method is not open to any role", "unmapped")
        if OPERATOR in principal.roles or principal.roles & allowed:
            return
        held = ", ".join(sorted(principal.roles)) or "no role"
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      f"{principal.name} ({held}) may not call {method.lstrip('/')}: it needs "
                      f"{' or '.join(sorted(allowed | {OPERATOR}))}", "role")

    def check(self, method: str, metadata, auth_context) -> Principal | None:
        """`auth_context`: the peer's (grpc's ServicerContext.auth_context()), or a callable giving it."""
        if self.is_open(method):
            return None
        identities = ((lambda: certificate_identities(auth_context())) if callable(auth_context)
                      else certificate_identities(auth_context))
        principal = self.authenticate(bearer_token(metadata), identities)
        self.authorize(method, principal)
        return principal


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks every call before its handler runs (all four call shapes)."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self.authorizer.is_open(method):
            return handler
        metadata = handler_call_details.invocation_metadata
        authorizer = self.authorizer

        audited = authorizer.method_roles.get(method) == _OPERATOR

        def admit(context) -> None:
            try:
                principal = authorizer.check(method, metadata, context.auth_context)
                if audited and principal is not None:
                    # Who dropped a group, trained, rolled back: the audit trail of operator calls.
                    log.info("operator call", extra={"method": method, "principal": principal.name,
                                                     "via": principal.via, "peer": context.peer()})
            except Refused as refused:
                DENIED.labels(method if method in authorizer.method_roles else "other", refused.reason).inc()
                log.info("call refused", extra={"method": method[:200], "code": refused.code.name,
                                                "reason": refused.reason, "peer": context.peer()})
                context.abort(refused.code, refused.message)

        def wrap_unary(behaviour, _streaming_request: bool):
            def wrapped(request, context):
                admit(context)
                return behaviour(request, context)
            return wrapped

        def wrap_stream(behaviour, _streaming_request: bool):
            def wrapped(request, context):
                admit(context)
                yield from behaviour(request, context)
            return wrapped

        return wrap_handler(handler, wrap_unary, wrap_stream)
