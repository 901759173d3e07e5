"""The security core without servers: the role table covers every RPC of every proto, the
authorizer's decisions, credential parsing and settings validation, message limits."""
from __future__ import annotations

import importlib
import pkgutil

import grpc
import pytest

import deltarec.v1
from services.common import auth, limits
from services.common.auth import OPERATOR, SERVICE, STOREFRONT, Authorizer, Principal, Refused
from services.common.config import ConfigError, SecurityConfig, load
from scripts.pki import CertificateAuthority

TOKENS = {STOREFRONT: "storefront-token-0123456789", SERVICE: "service-token-0123456789ab",
          OPERATOR: "operator-token-0123456789ab"}
TOKEN_SETTING = ",".join(f"{role}:{role}-1:{token}" for role, token in TOKENS.items())


def every_rpc() -> list[str]:
    """Every method of every service of every generated deltarec.v1 module, by full name."""
    names = []
    for module_info in pkgutil.iter_modules(deltarec.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"deltarec.v1.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            names += [f"/{service.full_name}/{method.name}" for method in service.methods]
    return names


def test_every_rpc_of_every_proto_has_roles_and_the_table_names_only_real_rpcs():
    rpcs = every_rpc()
    assert "/deltarec.v1.ConsistencyService/Reconcile" in rpcs     # the descriptors are all read
    unmapped = sorted(set(rpcs) - set(auth.METHOD_ROLES))
    assert not unmapped, f"RPCs without roles in services/common/auth.py METHOD_ROLES: {unmapped}"
    stale = sorted(set(auth.METHOD_ROLES) - set(rpcs))
    assert not stale, f"METHOD_ROLES names RPCs that no proto has: {stale}"
    assert all(roles and roles <= set(auth.ROLES) for roles in auth.METHOD_ROLES.values())


def test_every_service_has_deliberate_message_limits():
    services = {rpc.split("/")[1] for rpc in every_rpc()}
    assert services <= set(limits.SERVICE_LIMITS), services - set(limits.SERVICE_LIMITS)


@pytest.mark.parametrize("method,role", [
    ("/deltarec.v1.CollectorService/IngestEvents", STOREFRONT),
    ("/deltarec.v1.CollectorService/UpsertItems", STOREFRONT),
    ("/deltarec.v1.RankerService/Recommend", STOREFRONT),
    ("/deltarec.v1.RankerService/Search", STOREFRONT),
    ("/deltarec.v1.CollectorService/Subscribe", SERVICE),
    ("/deltarec.v1.FeaturesService/GetUserFeatures", SERVICE),
    ("/deltarec.v1.CollectorService/DropConsumerGroup", OPERATOR),
    ("/deltarec.v1.TrainerService/Train", OPERATOR),
    ("/deltarec.v1.ConsistencyService/Rollback", OPERATOR),
    ("/deltarec.v1.ConsistencyService/Reconcile", OPERATOR),
])
def test_the_issue_s_roles(method, role):
    authorizer = Authorizer(auth.parse_tokens(TOKEN_SETTING, "AUTH_TOKENS"))
    for caller, token in TOKENS.items():
        allowed = caller in (role, OPERATOR)
        metadata = (("authorization", f"Bearer {token}"),)
        if allowed:
            assert authorizer.check(method, metadata, None).roles == {caller}
        else:
            with pytest.raises(Refused) as refused:
                authorizer.check(method, metadata, None)
            assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert method.lstrip("/") in refused.value.message and token not in refused.value.message


def test_missing_malformed_and_unknown_credentials_are_unauthenticated_and_never_echoed():
    authorizer = Authorizer(auth.parse_tokens(TOKEN_SETTING, "AUTH_TOKENS"))
    method = "/deltarec.v1.RankerService/Recommend"
    for metadata in ((), (("authorization", "Basic dXNlcjpwYXNz"),),
                     (("authorization", "Bearer not-a-known-token-at-all"),),
                     (("authorization", "Bearer " + TOKENS[STOREFRONT][:-1]),)):
        with pytest.raises(Refused) as refused:
            authorizer.check(method, metadata, None)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "not-a-known" not in refused.value.message and "dXNlc" not in refused.value.message


def test_health_is_open_and_reflection_follows_the_setting():
    open_reflection = Authorizer(auth.parse_tokens(TOKEN_SETTING, "AUTH_TOKENS"))
    assert open_reflection.check("/grpc.health.v1.Health/Check", (), None) is None
    assert open_reflection.check(auth.REFLECTION_METHODS[0], (), None) is None
    restricted = Authorizer(auth.parse_tokens(TOKEN_SETTING, "AUTH_TOKENS"), reflection_access="operator")
    assert restricted.check("/grpc.health.v1.Health/Watch", (), None) is None
    for method in auth.REFLECTION_METHODS:
        with pytest.raises(Refused):
            restricted.check(method, (), None)
        with pytest.raises(Refused):
            restricted.check(method, (("authorization", f"Bearer {TOKENS[STOREFRONT]}"),), None)
        assert restricted.check(method, (("authorization", f"Bearer {TOKENS[OPERATOR]}"),), None)


def test_an_rpc_missing_from_the_table_is_refused_even_to_operators():
    authorizer = Authorizer(auth.parse_tokens(TOKEN_SETTING, "AUTH_TOKENS"), method_roles={})
    with pytest.raises(Refused) as refused:
        authorizer.check("/deltarec.v1.RankerService/Recommend",
                         (("authorization", f"Bearer {TOKENS[OPERATOR]}"),), None)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_certificate_identities_map_to_roles_and_a_presented_token_decides():
    authorizer = Authorizer(auth.parse_tokens(TOKEN_SETTING, "AUTH_TOKENS"),
                            auth.parse_identities("spiffe://deltarec/ranker=service, ops.example=operator"))
    ranker = {"x509_subject_alternative_name": [b"spiffe://deltarec/ranker", b"ranker.local"],
              "x509_common_name": [b"ranker"]}
    assert authorizer.check("/deltarec.v1.FeaturesService/GetUserFeatures", (), ranker).via == "certificate"
    with pytest.raises(Refused) as refused:
        authorizer.check("/deltarec.v1.TrainerService/Train", (), ranker)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    unknown = {"x509_common_name": [b"stranger"]}
    with pytest.raises(Refused) as refused:
        authorizer.check("/deltarec.v1.FeaturesService/Status", (), unknown)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED and "no role" in refused.value.message
    # A wrong token is refused even with a good certificate; a good one decides the role.
    with pytest.raises(Refused) as refused:
        authorizer.check("/deltarec.v1.FeaturesService/Status", (("authorization", "Bearer wrong-wrong-wrong-1"),), ranker)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    principal = authorizer.check("/deltarec.v1.TrainerService/Train",
                                 (("authorization", f"Bearer {TOKENS[OPERATOR]}"),), ranker)
    assert principal == Principal("operator-1", frozenset({OPERATOR}), "token")


def test_tokens_file_is_reread_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "TOKEN_FILE_RECHECK_S", 0.0)
    path = tmp_path / "tokens"
    path.write_text("# role:name:token\nstorefront:web:first-token-0123456789\n")
    authorizer = Authorizer(tokens_file=str(path))
    method = "/deltarec.v1.RankerService/Search"
    assert authorizer.check(method, (("authorization", "Bearer first-token-0123456789"),), None)
    replacement = tmp_path / "tokens.new"
    replacement.write_text("storefront:web:second-token-0123456789\n")
    replacement.replace(path)
    assert authorizer.check(method, (("authorization", "Bearer second-token-0123456789"),), None)
    with pytest.raises(Refused):
        authorizer.check(method, (("authorization", "Bearer first-token-0123456789"),), None)
    # A broken rewrite keeps the last good tokens.
    path.write_text("storefront:web\n")
    assert authorizer.check(method, (("authorization", "Bearer second-token-0123456789"),), None)


def test_client_token_file_is_reread(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "TOKEN_FILE_RECHECK_S", 0.0)
    path = tmp_path / "token"
    path.write_text("client-token-one-0123456789\n")
    token = auth.ClientToken(file=str(path))
    assert token.value() == "client-token-one-0123456789"
    path.with_name("t2").write_text("client-token-two-0123456789")
    path.with_name("t2").replace(path)
    assert token.value() == "client-token-two-0123456789"


# ------------------------------------------------------------------------------ settings

def security(**environ) -> SecurityConfig:
    return load(SecurityConfig, environ)


def test_plaintext_without_authentication_is_the_default():
    config = security()
    assert not config.tls_cert_file and not config.auth_enabled and config.reflection_access == "open"
    assert config.grpc_max_metadata_bytes == limits.METADATA_BYTES


@pytest.fixture
def pki(tmp_path):
    ca = CertificateAuthority("test-ca")
    other = CertificateAuthority("other-ca")
    cert, key = ca.issue("svc").write(tmp_path)
    other_cert, other_key = other.issue("svc-other").write(tmp_path)
    return {"ca": str(ca.write(tmp_path / "ca.pem")), "cert": str(cert), "key": str(key),
            "other_cert": str(other_cert), "other_key": str(other_key)}


def test_tls_settings_are_validated(pki, tmp_path):
    ok = security(TLS_CERT_FILE=pki["cert"], TLS_KEY_FILE=pki["key"], TLS_CLIENT_CA_FILE=pki["ca"],
                  TLS_CA_FILE=pki["ca"])
    assert ok.tls_client_ca_file == pki["ca"]
    cases = [
        ({"TLS_CERT_FILE": pki["cert"]}, "set both"),
        ({"TLS_CLIENT_CA_FILE": pki["ca"]}, "needs TLS_CERT_FILE"),
        ({"TLS_CERT_FILE": pki["cert"], "TLS_KEY_FILE": pki["other_key"]}, "is not the key of"),
        ({"TLS_CERT_FILE": pki["cert"], "TLS_KEY_FILE": str(tmp_path / "missing.key")}, "not a readable file"),
        ({"TLS_CA_FILE": pki["key"]}, "no PEM certificate"),
        ({"TLS_CERT_FILE": pki["key"], "TLS_KEY_FILE": pki["key"]}, "not a PEM certificate"),
    ]
    for environ, message in cases:
        with pytest.raises(ConfigError, match=message):
            security(**environ)


def test_auth_settings_are_validated_and_errors_never_show_a_token(pki, tmp_path):
    assert security(AUTH_ENABLED="true", AUTH_TOKENS=TOKEN_SETTING).auth_enabled
    cases = [
        ({"AUTH_TOKENS": TOKEN_SETTING}, "AUTH_ENABLED is false"),
        ({"AUTH_ENABLED": "true"}, "needs AUTH_TOKENS"),
        ({"AUTH_ENABLED": "true", "AUTH_TOKENS": "admin:x:abcdefghijklmnopqrstuvwxyz"}, "is not one of"),
        ({"AUTH_ENABLED": "true", "AUTH_TOKENS": "storefront:web:short-secret"}, "16-512 characters"),
        ({"AUTH_ENABLED": "true", "AUTH_TOKENS": "storefront:web:has space in the token"}, "16-512"),
        ({"AUTH_ENABLED": "true", "AUTH_TOKENS": "storefront-no-fields-0123456789"}, "role:name:token"),
        ({"AUTH_ENABLED": "true", "AUTH_IDENTITIES": "ranker=service"}, "needs TLS_CLIENT_CA_FILE"),
        ({"AUTH_ENABLED": "true", "AUTH_TOKENS_FILE": str(tmp_path / "none")}, "AUTH_TOKENS_FILE"),
        ({"REFLECTION_ACCESS": "operator"}, "needs AUTH_ENABLED"),
        ({"REFLECTION_ACCESS": "nobody"}, "must be one of"),
        ({"AUTH_CLIENT_TOKEN": "short"}, "AUTH_CLIENT_TOKEN"),
    ]
    for environ, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            security(**environ)
        assert "short-secret" not in str(error.value) and "has space" not in str(error.value)
    identities = security(AUTH_ENABLED="true", TLS_CERT_FILE=pki["cert"], TLS_KEY_FILE=pki["key"],
                          TLS_CLIENT_CA_FILE=pki["ca"], AUTH_IDENTITIES="spiffe://x/ranker=service")
    assert auth.parse_identities(identities.auth_identities) == {"spiffe://x/ranker": {SERVICE}}


def test_a_credentials_file_wins_and_both_forms_with_different_values_are_refused(tmp_path, monkeypatch):
    """X and X_FILE: set one; with X_FILE the watched file is the source (config.load also
    reads it into X once), so a token removed from it stops working."""
    monkeypatch.setattr(auth, "TOKEN_FILE_RECHECK_S", 0.0)
    path = tmp_path / "tokens"
    path.write_text(TOKEN_SETTING + "\n")
    with pytest.raises(ConfigError, match="set one"):
        security(AUTH_ENABLED="true", AUTH_TOKENS="storefront:x:another-token-0123456789", AUTH_TOKENS_FILE=str(path))
    # config.load resolves AUTH_TOKENS_FILE into AUTH_TOKENS too (every X_FILE): the file still decides.
    config = security(AUTH_ENABLED="true", AUTH_TOKENS_FILE=str(path))
    authorizer = Authorizer.from_config(config)
    method, storefront = "/deltarec.v1.RankerService/Recommend", (("authorization", f"Bearer {TOKENS[STOREFRONT]}"),)
    assert authorizer.check(method, storefront, None)
    replacement = tmp_path / "tokens.new"
    replacement.write_text(f"operator:ops:{TOKENS[OPERATOR]}\n")
    replacement.replace(path)
    with pytest.raises(Refused):
        authorizer.check(method, storefront, None)
    token_file = tmp_path / "client-token"
    token_file.write_text("client-token-in-file-0123456789\n")
    with pytest.raises(ConfigError, match="set one"):
        security(AUTH_CLIENT_TOKEN="client-token-inline-0123456789", AUTH_CLIENT_TOKEN_FILE=str(token_file))
    client = security(AUTH_CLIENT_TOKEN_FILE=str(token_file))
    assert auth.ClientToken.from_config(client).value() == "client-token-in-file-0123456789"
    token_file.with_name("t2").write_text("client-token-rotated-0123456789")
    token_file.with_name("t2").replace(token_file)
    assert auth.ClientToken.from_config(client).value() == "client-token-rotated-0123456789"


def test_services_refuse_to_start_on_bad_security_settings():
    from services.collector.config import CollectorConfig
    with pytest.raises(ConfigError, match="TLS_KEY_FILE"):
        load(CollectorConfig, {"DATABASE_URL": "postgresql://x/y", "TLS_CERT_FILE": "/etc/hostname"})


# ------------------------------------------------------------------------------ limits

def test_clients_mirror_the_server_limits():
    server = limits.server_limits(["deltarec.v1.FeaturesService"])
    client = dict(limits.client_options("deltarec.v1.FeaturesService"))
    assert client["grpc.max_receive_message_length"] == server.send_bytes
    assert client["grpc.max_send_message_length"] == server.receive_bytes
    assert limits.server_limits(["deltarec.v1.RankerService"], 2 * limits.MIB, 0) == \
        limits.MessageLimits(2 * limits.MIB, limits.SERVICE_LIMITS["deltarec.v1.RankerService"].send_bytes)
    assert limits.server_limits(["unknown.Service"]) == limits.DEFAULT_LIMITS
