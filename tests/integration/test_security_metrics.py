"""The Prometheus endpoint over HTTPS with the service's certificate (reloaded like the gRPC
server's), optionally requiring a scraper's client certificate and/or a bearer token, on the
services' own bootstrap (GrpcService with a SecurityConfig from settings) and real sockets on
loopback. Certificates come from CAs made at run time (scripts/pki.py)."""
from __future__ import annotations

import http.client
import ssl
import time

import pytest
from cryptography import x509

from scripts.pki import CertificateAuthority
from services.common.config import ConfigError, SecurityConfig, load
from services.common.metrics_http import SCRAPES_REFUSED
from services.common.server import GrpcService
from tests.support import wait_until

pytestmark = pytest.mark.integration

TOKEN = "prometheus-scrape-token-0123456789"


@pytest.fixture
def pki(tmp_path):
    service_ca, scraper_ca = CertificateAuthority("services-ca"), CertificateAuthority("scrapers-ca")
    cert, key = service_ca.issue("ranker").write(tmp_path, "ranker")
    return {"dir": tmp_path, "service_ca": service_ca, "scraper_ca": scraper_ca,
            "ca_file": service_ca.write(tmp_path / "ca.pem"), "scraper_ca_file": scraper_ca.write(tmp_path / "scrapers.pem"),
            "cert": cert, "key": key, "prometheus": scraper_ca.issue("prometheus").write(tmp_path, "prometheus"),
            "intruder": service_ca.issue("intruder").write(tmp_path, "intruder")}


@pytest.fixture
def serve():
    started = []

    def start(environ: dict[str, str]) -> GrpcService:
        service = GrpcService("metrics-test", [], port=0, metrics_port=0, grace_s=0,
                              security=load(SecurityConfig, environ))
        started.append(service)
        return service
    yield start
    for service in started:
        service.metrics.close()
        service.stop(0)


def tls_env(pki, **extra) -> dict[str, str]:
    return {"TLS_CERT_FILE": str(pki["cert"]), "TLS_KEY_FILE": str(pki["key"]), **extra}


def scrape(port: int, *, ca=None, client=None, token=None, scheme="https"):
    """(status, body, the server certificate's serial) of GET /metrics; raises on a failed handshake."""
    if scheme == "https":
        context = ssl.create_default_context(cafile=str(ca))
        context.check_hostname = False        # the leaf names localhost/127.0.0.1; the CA is what matters
        if client:
            context.load_cert_chain(str(client[0]), str(client[1]))
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
        serial = None
        if scheme == "https":
            serial = x509.load_der_x509_certificate(connection.sock.getpeercert(binary_form=True)).serial_number
        response = connection.getresponse()
        return response.status, response.read(), serial
    finally:
        connection.close()


def refused_count(reason: str) -> float:
    return SCRAPES_REFUSED.labels(reason)._value.get()


def test_metrics_are_served_over_https_when_the_service_has_tls_and_plaintext_is_refused(pki, serve):
    service = serve(tls_env(pki))
    assert service.metrics.scheme == "https"
    status, body, _ = scrape(service.metrics_port, ca=pki["ca_file"])
    assert status == 200 and b"python_info" in body
    before = refused_count("tls")
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        scrape(service.metrics_port, scheme="http")
    # A scraper that does not trust the service CA does not get in either (its own check).
    with pytest.raises(ssl.SSLError):
        scrape(service.metrics_port, ca=pki["scraper_ca_file"])
    # Counted by the server's connection thread, which may finish after the client gave up.
    wait_until(lambda: refused_count("tls") >= before + 1, "the refusal to be counted", 10)
    # Still serving afterwards.
    assert scrape(service.metrics_port, ca=pki["ca_file"])[0] == 200


def test_without_tls_or_with_metrics_tls_off_the_endpoint_is_plain_http(pki, serve):
    assert serve({}).metrics.scheme == "http"
    off = serve(tls_env(pki, METRICS_TLS="off"))
    assert off.metrics.scheme == "http"
    assert scrape(off.metrics_port, scheme="http")[0] == 200


def test_a_client_certificate_of_the_scrapers_ca_is_required_when_configured(pki, serve):
    service = serve(tls_env(pki, METRICS_CLIENT_CA_FILE=str(pki["scraper_ca_file"])))
    assert scrape(service.metrics_port, ca=pki["ca_file"], client=pki["prometheus"])[0] == 200
    before = refused_count("tls")
    for client in (None, pki["intruder"]):        # none, or one of another CA (the services' own)
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            scrape(service.metrics_port, ca=pki["ca_file"], client=client)
    wait_until(lambda: refused_count("tls") >= before + 2, "the refusals to be counted", 10)
    assert scrape(service.metrics_port, ca=pki["ca_file"], client=pki["prometheus"])[0] == 200


def test_a_bearer_token_is_required_when_configured_and_the_file_is_re_read(pki, serve):
    tokens = pki["dir"] / "scrape-tokens"
    tokens.write_text(f"# Prometheus\n{TOKEN}\n")
    service = serve(tls_env(pki, METRICS_BEARER_TOKEN_FILE=str(tokens)))
    before = refused_count("token")
    for token in (None, "not-the-scrape-token-0123456789", TOKEN[:-1]):
        status, body, _ = scrape(service.metrics_port, ca=pki["ca_file"], token=token)
        assert status == 401 and body == b""
    assert refused_count("token") == before + 3
    assert scrape(service.metrics_port, ca=pki["ca_file"], token=TOKEN)[0] == 200

    # Rotation: the new token is added, then the old one removed.
    new = "rotated-scrape-token-abcdefghijklmnop"
    tokens.write_text(f"{TOKEN}\n{new}\n")
    assert scrape(service.metrics_port, ca=pki["ca_file"], token=new)[0] == 200
    tokens.write_text(f"{new}\n")
    assert scrape(service.metrics_port, ca=pki["ca_file"], token=TOKEN)[0] == 401
    # A file emptied by mistake keeps the tokens read before (a scrape outage is not a fix).
    tokens.write_text("")
    assert scrape(service.metrics_port, ca=pki["ca_file"], token=new)[0] == 200


def test_a_rotated_certificate_is_served_to_new_connections_and_half_a_rotation_is_not(pki, serve):
    service = serve(tls_env(pki))
    _, _, first = scrape(service.metrics_port, ca=pki["ca_file"])
    renewed = pki["service_ca"].issue("ranker")
    # Half a rotation: the certificate is new, the key not yet. The old pair stays in use.
    pki["cert"].write_bytes(renewed.cert_pem)
    time.sleep(0.05)
    assert scrape(service.metrics_port, ca=pki["ca_file"])[2] == first
    pki["key"].write_bytes(renewed.key_pem)
    status, _, serial = scrape(service.metrics_port, ca=pki["ca_file"])
    assert status == 200 and serial != first
    assert service.metrics.contexts.reloads == 1


@pytest.mark.parametrize("environ, named", [
    ({"METRICS_CLIENT_CA_FILE": "{scraper_ca_file}"}, "METRICS_CLIENT_CA_FILE needs"),
    ({"METRICS_CLIENT_CA_FILE": "{cert}x", **{"TLS_CERT_FILE": "{cert}", "TLS_KEY_FILE": "{key}"}},
     "METRICS_CLIENT_CA_FILE"),
    ({"METRICS_BEARER_TOKEN_FILE": "{dir}/absent"}, "METRICS_BEARER_TOKEN_FILE"),
    ({"METRICS_TLS": "sometimes"}, "METRICS_TLS"),
])
def test_metrics_settings_are_checked_at_start(pki, environ, named):
    values = {key: value.format(**{k: str(v) for k, v in pki.items()}) for key, value in environ.items()}
    with pytest.raises(ConfigError) as error:
        load(SecurityConfig, values)
    assert named in str(error.value)


def test_a_malformed_token_file_is_refused_without_echoing_the_token(pki):
    tokens = pki["dir"] / "tokens"
    tokens.write_text("short\n")
    with pytest.raises(ConfigError) as error:
        load(SecurityConfig, {"METRICS_BEARER_TOKEN_FILE": str(tokens)})
    assert "line 1" in str(error.value) and "short" not in str(error.value)
