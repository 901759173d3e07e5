"""TLS and mutual TLS from files named by the environment, reloaded when the files change.

Servers: `server_credentials(config)` gives dynamic credentials whose certificate-configuration
fetcher gRPC calls at every new TLS handshake; the fetcher looks at the files' identity (inode,
size, mtime), and when they changed (Kubernetes swaps a Secret's files atomically; cert-manager
renews them) reads them again, checks that the key matches the certificate and that every file
parses, and only then hands the new pair (and client CA) to gRPC. New connections get the new
certificate; established ones keep theirs (TLS does not re-authenticate a live connection). A
half-written rotation (certificate rewritten, key not yet) is not applied: the previous files
stay in use and the next handshake looks again.

Clients: gRPC channel credentials are fixed for a channel's life, so channels.py re-creates the
channel when `ClientFiles.fingerprint()` changes (see there).
"""
from __future__ import annotations

import logging
import os
import threading
import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import Counter, Gauge

from services.common.config import ConfigError

log = logging.getLogger(__name__)


RELOADS = Counter("deltarec_tls_reloads_total", "TLS files re-read after they changed", ["side"])
CERTIFICATE_EXPIRY = Gauge("deltarec_tls_certificate_expiry_timestamp_seconds",
                           "notAfter of the certificate this server presents (alert before it passes)")


class TlsFilesInvalid(ValueError):
    pass


def check_config(config) -> None:
    """Cross-field checks of SecurityConfig's TLS_* settings (ConfigError naming the variable)."""
    cert, key = config.tls_cert_file, config.tls_key_file
    if bool(cert) != bool(key):
        raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE: set both or neither")
    if config.tls_client_ca_file and not cert:
        raise ConfigError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE (mutual TLS is TLS)")
    for name, path in (("TLS_CERT_FILE", cert), ("TLS_KEY_FILE", key),
                       ("TLS_CLIENT_CA_FILE", config.tls_client_ca_file), ("TLS_CA_FILE", config.tls_ca_file)):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{name}={path!r}: not a readable file")
    if cert:
        try:
            read_key_pair(cert, key)
            if config.tls_client_ca_file:
                read_ca_bundle(config.tls_client_ca_file)
        except TlsFilesInvalid as error:
            raise ConfigError(str(error)) from None
    if config.tls_ca_file:
        try:
            read_ca_bundle(config.tls_ca_file)
        except TlsFilesInvalid as error:
            raise ConfigError(str(error)) from None


def server_tls_enabled(config) -> bool:
    return bool(config is not None and config.tls_cert_file)


def client_tls_enabled(config) -> bool:
    return bool(config is not None and config.tls_ca_file)


# ------------------------------------------------------------------------------ reading files

def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise TlsFilesInvalid(f"{what} {path!r}: {error.strerror}") from None


def read_key_pair(cert_path: str, key_path: str,
                  names: tuple[str, str] = ("TLS_CERT_FILE", "TLS_KEY_FILE")) -> tuple[bytes, bytes]:
    """(key PEM, certificate chain PEM), checked: both parse and the key is the certificate's.
    `names`: the settings the paths came from, for the messages (ETCD_CERT_FILE, ...)."""
    cert_name, key_name = names
    cert_pem, key_pem = _read(cert_path, cert_name), _read(key_path, key_name)
    try:
        certificate = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise TlsFilesInvalid(f"{cert_name} {cert_path!r}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TlsFilesInvalid(f"{key_name} {key_path!r}: not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, public)
            != certificate.public_key().public_bytes(serialization.Encoding.DER, public)):
        raise TlsFilesInvalid(f"{key_name} {key_path!r} is not the key of {cert_name} {cert_path!r}")
    return key_pem, cert_pem


def not_after(cert_pem: bytes) -> float:
    """The leaf certificate's expiry, as a Unix time."""
    return x509.load_pem_x509_certificates(cert_pem)[0].not_valid_after_utc.timestamp()


def read_ca_bundle(path: str, name: str = "CA file") -> bytes:
    pem = _read(path, name)
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TlsFilesInvalid(f"{name} {path!r}: no PEM certificate in it") from None
    return pem


def fingerprint(*paths: str) -> tuple:
    """What identifies the current content of the files, cheaply (one stat each)."""
    marks = []
    for path in paths:
        if not path:
            marks.append(None)
            continue
        try:
            stat = os.stat(path)
            marks.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
        except OSError:
            marks.append(None)
    return tuple(marks)


# ------------------------------------------------------------------------------ servers

class ServerCertificates:
    """The certificate-configuration fetcher of one server (see the module docstring)."""

    def __init__(self, cert_path: str, key_path: str, client_ca_path: str = "") -> None:
        self.cert_path, self.key_path, self.client_ca_path = cert_path, key_path, client_ca_path
        self.reloads = 0
        self._lock = threading.Lock()
        self._mark = fingerprint(cert_path, key_path, client_ca_path)
        self.initial = self._configuration()   # raises TlsFilesInvalid: the service does not start

    def _configuration(self):
        key_pem, cert_pem = read_key_pair(self.cert_path, self.key_path)
        roots = read_ca_bundle(self.client_ca_path) if self.client_ca_path else None
        configuration = grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=roots)
        CERTIFICATE_EXPIRY.set(not_after(cert_pem))
        return configuration

    def __call__(self):
        """Called by gRPC before each handshake: a new configuration, or None for 'unchanged'."""
        mark = fingerprint(self.cert_path, self.key_path, self.client_ca_path)
        if mark == self._mark:
            return None
        with self._lock:
            if mark == self._mark:
                return None
            try:
                configuration = self._configuration()
            except TlsFilesInvalid as error:
                # Keep serving the previous certificate; look again at the next handshake.
                log.warning("TLS files changed but are not usable yet; keeping the previous ones",
                            extra={"error": str(error)[:300]})
                return None
            except Exception as error:  # noqa: BLE001 - never fail a handshake over a reload
                log.error("TLS reload failed; keeping the previous certificate", extra={"error": str(error)[:300]})
                return None
            self._mark = mark
            self.reloads += 1
        RELOADS.labels("server").inc()
        log.info("TLS certificate reloaded", extra={"cert": self.cert_path, "reloads": self.reloads})
        return configuration


def server_credentials(config) -> tuple[grpc.ServerCredentials, ServerCertificates]:
    certificates = ServerCertificates(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    credentials = grpc.dynamic_ssl_server_credentials(
        certificates.initial, certificates,
        require_client_authentication=bool(config.tls_client_ca_file))
    return credentials, certificates


# ------------------------------------------------------------------------------ clients

class ClientFiles:
    """The files a client's TLS credentials come from: the CA it trusts and, for mutual TLS, this
    process's certificate and key (the same pair its server serves: issue it for both server and
    client authentication)."""

    def __init__(self, ca_path: str, cert_path: str = "", key_path: str = "") -> None:
        self.ca_path, self.cert_path, self.key_path = ca_path, cert_path, key_path

    def fingerprint(self) -> tuple:
        return fingerprint(self.ca_path, self.cert_path, self.key_path)

    def credentials(self, *, last_good: bool = False) -> grpc.ChannelCredentials:
        """Credentials from the files as they are now. With `last_good`, files caught in the
        middle of a rotation give the credentials last read from them instead of an error (a new
        channel — a reconnecting consumer — must not fail because of a half-written Secret)."""
        key = (self.ca_path, self.cert_path, self.key_path)
        try:
            roots = read_ca_bundle(self.ca_path)
            if self.cert_path:
                key_pem, cert_pem = read_key_pair(self.cert_path, self.key_path)
                credentials = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key_pem,
                                                           certificate_chain=cert_pem)
            else:
                credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        except TlsFilesInvalid as error:
            if not last_good or key not in _LAST_GOOD:
                raise
            log.warning("TLS files not usable right now; using the ones read before",
                        extra={"error": str(error)[:300]})
            return _LAST_GOOD[key]
        _LAST_GOOD[key] = credentials
        return credentials


_LAST_GOOD: dict[tuple[str, str, str], grpc.ChannelCredentials] = {}
