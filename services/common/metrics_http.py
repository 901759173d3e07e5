"""The Prometheus endpoint of every service (`METRICS_PORT`), over HTTPS whenever the service's
gRPC port is.

* *TLS*: with `TLS_CERT_FILE`/`TLS_KEY_FILE` set (and `METRICS_TLS=auto`, the default) the
  endpoint serves the same certificate as the gRPC server, re-read when the files change with the
  same rules (services/common/tls.py: the files must parse and the key must be the certificate's,
  else the previous pair stays): each new connection gets the context current when it was
  accepted. `METRICS_TLS=off` keeps it plaintext (TLS terminated by something in front).
* *Who may scrape*: `METRICS_CLIENT_CA_FILE` requires a client certificate signed by that CA (the
  scraper's, e.g. Prometheus's own, not necessarily the services' CA); `METRICS_BEARER_TOKEN_FILE`
  requires `Authorization: Bearer <token>` with one of the file's tokens (one a line, `#` comments,
  re-read when the file changes: add the new token, move Prometheus, remove the old one), compared
  as sha256 digests in constant time. Either, both, or neither.

A refused scrape (failed handshake, missing or wrong token) is the client's problem: counted in
`deltarec_metrics_scrapes_refused_total{reason}`, logged at DEBUG, never a traceback. The TLS
handshake runs in the connection's own thread with a deadline, so a client that never finishes it
does not hold up the others.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import socket
import ssl
import threading
from http.server import ThreadingHTTPServer

from prometheus_client import Counter
from prometheus_client.exposition import MetricsHandler

from services.common import tls
from services.common.config import ConfigError

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")

SCRAPES_REFUSED = Counter("deltarec_metrics_scrapes_refused_total",
                          "scrapes of the metrics endpoint refused", ["reason"])


class ScrapeTokensInvalid(ValueError):
    pass


def metrics_tls_enabled(config) -> bool:
    return bool(config is not None and config.metrics_tls == "auto" and tls.server_tls_enabled(config))


def check_config(config) -> None:
    """Cross-field checks of the METRICS_* settings of SecurityConfig (ConfigError naming the variable)."""
    if config.metrics_client_ca_file:
        if not metrics_tls_enabled(config):
            raise ConfigError("METRICS_CLIENT_CA_FILE needs the metrics endpoint on TLS "
                              "(TLS_CERT_FILE and TLS_KEY_FILE set, METRICS_TLS=auto)")
        try:
            tls.read_ca_bundle(config.metrics_client_ca_file, "METRICS_CLIENT_CA_FILE")
        except tls.TlsFilesInvalid as error:
            raise ConfigError(str(error)) from None
    if config.metrics_bearer_token_file:
        try:
            read_tokens(config.metrics_bearer_token_file)
        except ScrapeTokensInvalid as error:
            raise ConfigError(str(error)) from None


def read_tokens(path: str) -> list[bytes]:
    """The sha256 digests of the file's tokens (at least one)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ScrapeTokensInvalid(f"METRICS_BEARER_TOKEN_FILE {path!r}: cannot read "
                                  f"({getattr(error, 'strerror', None) or 'not UTF-8'})") from None
    digests = []
    for number, line in enumerate(lines, 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not TOKEN_PATTERN.fullmatch(token):
            # Never the token itself in the message: only where it is.
            raise ScrapeTokensInvalid(f"METRICS_BEARER_TOKEN_FILE {path!r} line {number}: a token is "
                                      "16-512 characters of A-Za-z0-9._~+/=-")
        digests.append(hashlib.sha256(token.encode()).digest())
    if not digests:
        raise ScrapeTokensInvalid(f"METRICS_BEARER_TOKEN_FILE {path!r}: no token in it")
    return digests


class _Reloading:
    """Something built from files, built again when their identity (inode, size, mtime) changes;
    a build that fails keeps the previous value."""

    what = "files"

    def __init__(self, *paths: str) -> None:
        self.paths = paths
        self.reloads = 0
        self._lock = threading.Lock()
        self._mark = tls.fingerprint(*paths)
        self._value = self._build()          # raises: the service does not start

    def _build(self):
        raise NotImplementedError

    def current(self):
        mark = tls.fingerprint(*self.paths)
        if mark != self._mark:
            with self._lock:
                if mark != self._mark:
                    try:
                        self._value = self._build()
                    except (tls.TlsFilesInvalid, ScrapeTokensInvalid, ssl.SSLError, OSError) as error:
                        log.warning(f"metrics {self.what} changed but are not usable yet; keeping the previous ones",
                                    extra={"error": str(error)[:300]})
                    else:
                        self._mark = mark
                        self.reloads += 1
                        tls.RELOADS.labels("metrics").inc()
                        log.info(f"metrics {self.what} reloaded", extra={"reloads": self.reloads})
        return self._value


class ServerContexts(_Reloading):
    """The SSLContext new metrics connections get."""

    what = "TLS files"

    def __init__(self, cert_path: str, key_path: str, client_ca_path: str = "") -> None:
        self.cert_path, self.key_path, self.client_ca_path = cert_path, key_path, client_ca_path
        super().__init__(cert_path, key_path, client_ca_path)

    def _build(self) -> ssl.SSLContext:
        tls.read_key_pair(self.cert_path, self.key_path)          # parse + the key is the certificate's
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        if self.client_ca_path:
            tls.read_ca_bundle(self.client_ca_path, "METRICS_CLIENT_CA_FILE")
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.client_ca_path)
        return context


class ScrapeTokens(_Reloading):
    what = "bearer tokens"

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(path)

    def _build(self) -> list[bytes]:
        return read_tokens(self.path)

    def allows(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        # Every entry compared (no early exit), digests of equal length: constant time.
        matches = [hmac.compare_digest(digest, known) for known in self.current()]
        return scheme.lower() == "bearer" and any(matches)


class _Handler(MetricsHandler):
    tokens: ScrapeTokens | None = None

    def do_GET(self) -> None:
        if self.tokens is not None and not self.tokens.allows(self.headers.get("Authorization")):
            SCRAPES_REFUSED.labels("token").inc()
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="metrics"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, contexts: ServerContexts | None) -> None:
        self.contexts = contexts
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def get_request(self):
        connection, address = super().get_request()
        if self.contexts is not None:
            connection.settimeout(HANDSHAKE_TIMEOUT_S)
            connection = self.contexts.current().wrap_socket(connection, server_side=True,
                                                             do_handshake_on_connect=False)
        return connection, address

    def finish_request(self, request, client_address) -> None:
        # In the connection's thread (ThreadingMixIn), not the accepting one.
        if isinstance(request, ssl.SSLSocket):
            request.do_handshake()
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        # A plaintext client, no or an unknown client certificate, a reset: the client's problem.
        reason = "tls" if isinstance(request, ssl.SSLSocket) else "connection"
        SCRAPES_REFUSED.labels(reason).inc()
        log.debug("metrics connection failed", extra={"peer": str(client_address[0]), "reason": reason})


class MetricsEndpoint:
    def __init__(self, server: MetricsServer, tokens: ScrapeTokens | None) -> None:
        self.server, self.tokens = server, tokens
        self.port = server.server_address[1]
        self.scheme = "https" if server.contexts is not None else "http"
        self._thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def contexts(self) -> ServerContexts | None:
        return self.server.contexts

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start(host: str, port: int, security=None) -> MetricsEndpoint:
    """Serves the default registry on host:port (0: a free port) as `security` says (None: plaintext,
    open, as for local runs)."""
    contexts = tokens = None
    if metrics_tls_enabled(security):
        contexts = ServerContexts(security.tls_cert_file, security.tls_key_file, security.metrics_client_ca_file)
    elif security is not None and tls.server_tls_enabled(security):
        log.warning("METRICS_TLS=off: the metrics endpoint is plaintext although the gRPC port is TLS")
    if security is not None and security.metrics_bearer_token_file:
        tokens = ScrapeTokens(security.metrics_bearer_token_file)
        if contexts is None:
            log.warning("metrics bearer token without TLS: the token crosses the network in clear")
    handler = type("DeltaRecMetricsHandler", (_Handler,), {"tokens": tokens})
    return MetricsEndpoint(MetricsServer((host, port), handler, contexts), tokens)

