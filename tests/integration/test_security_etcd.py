"""etcd over TLS with client certificates and etcd authentication, for real: an etcd started by
scripts/infra.py with `tls=True, auth=True` (its CA and certificates made at run time by
scripts/pki.py), a trainer process configured only by the ETCD_* environment holding its leader
lease through it (and through an etcd restart, which forgets every auth token), clients without
TLS, without a certificate or without a user refused, an expired token renewed, and a rotated
client certificate picked up by new calls."""
from __future__ import annotations

import shutil
import time

import etcd3
import grpc
import pytest

from scripts import infra
from scripts.pki import CertificateAuthority
from services.common import tls
from services.common.config import EtcdConfig, load
from services.common.etcd import Etcd, EtcdAccess, EtcdUnavailable
from services.contracts.etcd_keys import TRAINER_LEADER
from tests.integration.test_trainer_service import TINY_MODEL
from tests.support import wait_until

pytestmark = pytest.mark.integration

TOKEN_TTL_S = 2      # etcd's --auth-token-ttl here: an idle token expires within the test
LEADER_TTL_S = 5     # the trainer's leader lease in the restart test (see there)


@pytest.fixture(scope="module")
def secure_etcd(tmp_path_factory):
    state = tmp_path_factory.mktemp("etcd-tls")
    port = infra.start_etcd(state, tls=True, auth=True, auth_token_ttl_s=TOKEN_TTL_S)
    yield state, f"127.0.0.1:{port}", infra.etcd_access(state)
    infra.stop_etcd(state)


def settings(endpoint: str, access: infra.EtcdAccessFiles, prefix: str, **override) -> dict[str, str]:
    return {"ETCD_ENDPOINT": endpoint, "ETCD_PREFIX": prefix, **access.as_environment(), **override}


def client(endpoint, access, prefix, **override) -> Etcd:
    """A client made the way every service makes it: EtcdConfig from the environment."""
    return Etcd.from_config(load(EtcdConfig, settings(endpoint, access, prefix, **override)), timeout_s=3)


def refused(etcd: Etcd) -> str:
    with pytest.raises(EtcdUnavailable) as error:
        etcd.get("anything")
    etcd.close()
    return str(error.value)


def test_a_service_holds_its_lease_over_tls_with_auth_and_through_an_etcd_restart(
        secure_etcd, database_url, etcd_prefix, start_service, tmp_path):
    state, endpoint, access = secure_etcd
    trainer = start_service("services.trainer", {
        "DATABASE_URL": database_url, "GRPC_PORT": "0", "METRICS_PORT": "0", "SHUTDOWN_GRACE_S": "2",
        "TRAINER_ARTIFACT_URI": (tmp_path / "artifacts").as_uri(), **TINY_MODEL,
        # Longer than the tiny model's 2 s: between etcd's stop and the first refresh that gets
        # through lie etcd's own start, the client's failed-endpoint pause (ENDPOINT_RETRY_S) and a
        # new authentication, which on these shared cores took more than 2 s about one run in
        # three; the lease then expired and the trainer took the key again with a new one.
        "TRAINER_LEADER_TTL_S": str(LEADER_TTL_S),
        **settings(endpoint, access, etcd_prefix)})
    etcd = client(endpoint, access, etcd_prefix)
    try:
        held = wait_until(lambda: etcd.get(TRAINER_LEADER), "the trainer to take its leader key over TLS")
        assert held.lease_id != 0

        # etcd restarts: every simple auth token is gone, the lease is not. The trainer's keep-alive
        # gets "invalid auth token", authenticates again and keeps the same lease alive.
        infra.stop_etcd(state)
        infra.start_etcd(state, tls=True, auth=True, auth_token_ttl_s=TOKEN_TTL_S)
        time.sleep(3 * LEADER_TTL_S)   # several TTLs: refreshes must succeed
        after = wait_until(lambda: etcd.get(TRAINER_LEADER), "the leader key after the restart")
        assert (after.value, after.lease_id) == (held.value, held.lease_id)
        assert trainer.process.poll() is None
    finally:
        etcd.close()


def test_clients_without_tls_certificate_or_user_are_refused(secure_etcd, etcd_prefix):
    _, endpoint, access = secure_etcd
    assert "connection failed" in refused(Etcd(endpoint, etcd_prefix, timeout_s=3))       # plaintext
    assert "connection failed" in refused(Etcd(endpoint, etcd_prefix, timeout_s=3,        # no client certificate
                                               access=EtcdAccess(ca_file=access.ca_file)))
    other_ca = CertificateAuthority("not-the-etcd-ca")                                    # etcd unverified
    other = other_ca.write(secure_etcd[0] / "other-ca.pem")
    assert "connection failed" in refused(client(endpoint, access, etcd_prefix, ETCD_CA_FILE=str(other)))
    # TLS and a valid certificate, but no etcd user (the certificate's CN is no etcd user either).
    assert "permission denied" in refused(Etcd(endpoint, etcd_prefix, timeout_s=3, access=EtcdAccess(
        ca_file=access.ca_file, cert_file=access.cert_file, key_file=access.key_file)))
    assert "permission denied" in refused(Etcd(endpoint, etcd_prefix, timeout_s=3, access=EtcdAccess(
        ca_file=access.ca_file, cert_file=access.cert_file, key_file=access.key_file,
        user=access.user, password="not-the-password")))


def test_a_client_certificate_whose_cn_is_an_etcd_user_needs_no_password(secure_etcd, etcd_prefix, tmp_path):
    """What the prod overlay relies on (no ETCD_USER there): with --client-cert-auth and auth on,
    etcd takes the certificate's CN as the user."""
    state, endpoint, access = secure_etcd
    ca = CertificateAuthority.load(state / "etcd-pki" / "ca.pem", state / "etcd-pki" / "ca.key")
    cert, key = ca.issue(infra.ETCD_USER, dns=(), ips=()).write(tmp_path, "by-cn")
    etcd = Etcd(endpoint, etcd_prefix, timeout_s=3, access=EtcdAccess(
        ca_file=access.ca_file, cert_file=str(cert), key_file=str(key)))
    try:
        etcd.put("by-cn", "yes")
        assert etcd.get("by-cn").value == b"yes" and etcd._token is None
    finally:
        etcd.close()


def test_an_expired_token_is_renewed_and_the_call_retried(secure_etcd, etcd_prefix):
    _, endpoint, access = secure_etcd
    etcd = client(endpoint, access, etcd_prefix)
    try:
        etcd.put("k", "v1")
        old_token = etcd._token
        time.sleep(TOKEN_TTL_S + 2)
        # The old token is really gone: a raw call with it is refused...
        raw = etcd._current
        with pytest.raises(grpc.RpcError) as expired:
            raw.kvstub.Range(etcd3.etcdrpc.RangeRequest(key=etcd.full_key("k").encode()), 3,
                             metadata=(("token", old_token),))
        assert "invalid auth token" in expired.value.details()
        # ...and the wrapper's next call authenticates again by itself.
        assert etcd.get("k").value == b"v1"
        assert etcd._token and etcd._token != old_token
    finally:
        etcd.close()


def test_a_rotated_client_certificate_is_used_by_new_calls(secure_etcd, etcd_prefix, tmp_path):
    state, endpoint, access = secure_etcd
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    shutil.copy(access.cert_file, cert)
    shutil.copy(access.key_file, key)
    etcd = client(endpoint, access, etcd_prefix, ETCD_CERT_FILE=str(cert), ETCD_KEY_FILE=str(key))
    try:
        etcd.put("k", "before")
        first = etcd._current
        reloads = tls.RELOADS.labels("etcd")._value.get()

        # Half a rotation (a key that is not the certificate's): not applied, calls keep working.
        stranger = CertificateAuthority("stranger").issue("x")
        key.write_bytes(stranger.key_pem)
        time.sleep(1.2)
        assert etcd.get("k").value == b"before" and etcd._current is first

        # The Secret rotated for real: a new certificate of the etcd CA (issued from its key).
        etcd_ca = CertificateAuthority.load(state / "etcd-pki" / "ca.pem", state / "etcd-pki" / "ca.key")
        etcd_ca.issue("deltarec-etcd-client-2", dns=(), ips=()).write(tmp_path, "client")
        time.sleep(1.2)
        etcd.put("k", "after")
        assert etcd._current is not first
        assert tls.RELOADS.labels("etcd")._value.get() == reloads + 1
        assert etcd.get("k").value == b"after"
    finally:
        etcd.close()
