"""A throw-away PKI for local runs, tests and benchmarks: certificate authorities and leaf
certificates generated at run time with the `cryptography` package (nothing committed, nothing
downloaded), and `DevPki`, the settings that run a whole suite over mutual TLS with roles
(`DELTAREC_RUN_SECURE=1 make run`, tests/integration/test_security_stack.py)."""
from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DeltaRec tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertificateAuthority:
    def __init__(self, name: str) -> None:
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256()))

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> "CertificateAuthority":
        """A CA written before (`write` + `write_key`), to issue more certificates from it."""
        ca = cls.__new__(cls)
        ca.certificate = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        ca.key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        ca.name = ca.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return ca

    @property
    def pem(self) -> bytes:
        return _pem(self.certificate)

    def write(self, path: Path) -> Path:
        return _write(path, self.pem)

    def write_key(self, path: Path) -> Path:
        """The CA's private key (mode 0600): for a CA that must issue again later (a rotation)."""
        written = _write(path, _key_pem(self.key))
        os.chmod(written, 0o600)
        return written

    def issue(self, common_name: str, dns: tuple[str, ...] = ("localhost",), uris: tuple[str, ...] = (),
              ips: tuple[str, ...] = ("127.0.0.1",)) -> "Leaf":
        """A leaf certificate for both server and client authentication (as the services use it)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        names = ([x509.DNSName(name) for name in dns] + [x509.UniformResourceIdentifier(uri) for uri in uris]
                 + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips])
        certificate = (
            x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.certificate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256()))
        return Leaf(common_name, _pem(certificate), _key_pem(key))


class Leaf:
    def __init__(self, common_name: str, cert_pem: bytes, key_pem: bytes) -> None:
        self.common_name, self.cert_pem, self.key_pem = common_name, cert_pem, key_pem

    def write(self, directory: Path, stem: str | None = None) -> tuple[Path, Path]:
        """(certificate path, key path), each replaced atomically (as a Secret volume does)."""
        stem = stem or self.common_name
        return _write(directory / f"{stem}.crt", self.cert_pem), _write(directory / f"{stem}.key", self.key_pem)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return path


class DevPki:
    """One CA, a certificate per service (identity `spiffe://deltarec/<service>`, SANs localhost
    and 127.0.0.1), and a tokens file with one token per role, under `directory`.

    Services authenticate to each other by certificate identity (`service`; the consistency
    service `operator`, it makes repairs); the storefront and operators by token."""

    ROLES = ("storefront", "service", "operator")
    OPERATOR_SERVICES = ("consistency",)

    def __init__(self, directory: Path, services=("collector", "features", "trainer", "ranker", "consistency")) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority("deltarec-dev-ca")
        self.ca_file = self.ca.write(self.directory / "ca.pem")
        self.tokens = {role: f"{role}-{secrets.token_urlsafe(24)}" for role in self.ROLES}
        self.tokens_file = _write(self.directory / "tokens",
                                  "".join(f"{role}:{role}-dev:{token}\n" for role, token in self.tokens.items()).encode())
        os.chmod(self.tokens_file, 0o600)
        self.services = tuple(services)
        self._issued: set[str] = set()
        self.identities = ",".join(
            f"spiffe://deltarec/{name}={'operator' if name in self.OPERATOR_SERVICES else 'service'}"
            for name in self.services)

    def pair(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of identity `name`, issued on first use."""
        cert, key = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        if name not in self._issued:         # files left by an earlier run belong to another CA
            self.ca.issue(name, uris=(f"spiffe://deltarec/{name}",)).write(self.directory, name)
            os.chmod(key, 0o600)
            self._issued.add(name)
        return cert, key

    def token_file(self, role: str) -> Path:
        path = self.directory / f"{role}.token"
        if path.name not in self._issued:
            self._issued.add(path.name)
            _write(path, self.tokens[role].encode() + b"\n")
            os.chmod(path, 0o600)
        return path

    def service_env(self, name: str) -> dict[str, str]:
        """The environment of service `name` ("ranker-a": a replica of the ranker)."""
        kind = next((service for service in self.services if name.startswith(service)), name)
        cert, key = self.pair(kind)
        return {"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key), "TLS_CLIENT_CA_FILE": str(self.ca_file),
                "TLS_CA_FILE": str(self.ca_file), "AUTH_ENABLED": "true", "AUTH_TOKENS_FILE": str(self.tokens_file),
                "AUTH_IDENTITIES": self.identities}

    def client_env(self, role: str | None, name: str) -> dict[str, str]:
        """Settings of a client (the storefront, an operator's tool) with identity `name` and the
        token of `role` (None: the certificate alone)."""
        cert, key = self.pair(name)
        environ = {"TLS_CA_FILE": str(self.ca_file), "TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}
        if role is not None:
            environ["AUTH_CLIENT_TOKEN"] = self.tokens[role]
        return environ

    def grpcurl_flags(self, role: str = "operator") -> str:
        cert, key = self.pair(role)
        return (f"-cacert {self.ca_file} -cert {cert} -key {key} "
                f"-H 'authorization: Bearer {self.tokens[role]}'")
