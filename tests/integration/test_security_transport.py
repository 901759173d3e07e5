"""TLS, mutual TLS, certificate rotation and the role of every RPC, over real gRPC on loopback.

The servers are the services' own bootstrap (GrpcService with a SecurityConfig from settings, as
every service builds it); for the role matrix every RPC of every proto is served by a handler that
answers an empty response, so each role's allowed and refused calls are checked for all of them.
Certificates come from a CA generated at run time (tests/pki.py)."""
from __future__ import annotations

import importlib
import pkgutil
import threading

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import deltarec.v1
from services.common import auth, channels, limits
from services.common.config import SecurityConfig, load
from services.common.delta_consumer import DeltaConsumer
from services.common.server import GrpcService
from scripts.pki import CertificateAuthority
from tests.support import wait_until

pytestmark = pytest.mark.integration

TOKENS = {auth.STOREFRONT: "storefront-secret-0123456789", auth.SERVICE: "service-secret-0123456789ab",
          auth.OPERATOR: "operator-secret-0123456789ab"}
TOKEN_SETTING = ",".join(f"{role}:{role}-1:{token}" for role, token in TOKENS.items())
ECHO = "deltarec.test.Echo"


def services_and_methods():
    for module_info in pkgutil.iter_modules(deltarec.v1.__path__):
        if module_info.name.endswith("_pb2"):
            module = importlib.import_module(f"deltarec.v1.{module_info.name}")
            for service in module.DESCRIPTOR.services_by_name.values():
                yield service, list(service.methods)


CALLED: list[str] = []      # full names of the RPCs whose handler ran


def _answer(method):
    full_name = f"/{method.containing_service.full_name}/{method.name}"
    response = message_factory.GetMessageClass(method.output_type)
    request = message_factory.GetMessageClass(method.input_type)
    if method.client_streaming and method.server_streaming:
        def behaviour(requests, context):
            CALLED.append(full_name)
            for _ in requests:
                yield response()
                return
        return grpc.stream_stream_rpc_method_handler(behaviour, request.FromString, response.SerializeToString)
    if method.client_streaming:
        def behaviour(requests, context):
            CALLED.append(full_name)
            for _ in requests:
                pass
            return response()
        return grpc.stream_unary_rpc_method_handler(behaviour, request.FromString, response.SerializeToString)
    if method.server_streaming:
        def behaviour(request_message, context):
            CALLED.append(full_name)
            yield response()
        return grpc.unary_stream_rpc_method_handler(behaviour, request.FromString, response.SerializeToString)
    def behaviour(request_message, context):
        CALLED.append(full_name)
        return response()
    return grpc.unary_unary_rpc_method_handler(behaviour, request.FromString, response.SerializeToString)


def who_am_i(request: bytes, context) -> bytes:
    """The peer certificate's CN as the server saw it."""
    return b",".join(context.auth_context().get("x509_common_name", [])) or b"-"


def start_server(security: SecurityConfig | None, rpcs_of: tuple[str, ...] = ()) -> GrpcService:
    """Serves Echo/Who, and every RPC of the services named in `rpcs_of` ("*": all of them)."""
    hosted = [(service, methods) for service, methods in services_and_methods()
              if "*" in rpcs_of or service.name in rpcs_of]
    server = GrpcService("security-test", [service.full_name for service, _ in hosted] or [ECHO],
                         metrics_port=None, grace_s=0, security=security)
    handlers = [grpc.method_handlers_generic_handler(ECHO, {"Who": grpc.unary_unary_rpc_method_handler(who_am_i)})]
    handlers += [grpc.method_handlers_generic_handler(service.full_name, {m.name: _answer(m) for m in methods})
                 for service, methods in hosted]
    server.server.add_generic_rpc_handlers(handlers)
    server.start()
    server.set_ready()
    return server


def call(channel, service, method, token: str | None = None, timeout: float = 10):
    """One call of `method` with an empty request; returns the status code."""
    path = f"/{service.full_name}/{method.name}"
    request = message_factory.GetMessageClass(method.input_type)()
    response = message_factory.GetMessageClass(method.output_type)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    kind = ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming else "unary")
    stub = getattr(channel, kind)(path, request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=response.FromString)
    argument = iter([request]) if method.client_streaming else request
    try:
        result = stub(argument, timeout=timeout, metadata=metadata)
        if method.server_streaming:
            list(result)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def who(channel, timeout: float = 10) -> str:
    return channel.unary_unary(f"/{ECHO}/Who")(b"", timeout=timeout).decode()


def echo_status(channel, timeout: float = 5) -> grpc.StatusCode:
    try:
        who(channel, timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def tls_client(ca_path, cert=None, key=None, **settings) -> grpc.Channel:
    """A client built like every internal client: channels.make_channel from settings."""
    environ = {"TLS_CA_FILE": str(ca_path), **settings}
    if cert:
        environ.update(TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key))
    return channels.make_channel(ADDRESS[0], ECHO, security=load(SecurityConfig, environ))


ADDRESS = ["127.0.0.1:0"]


@pytest.fixture
def pki(tmp_path):
    class Pki:
        ca = CertificateAuthority("deltarec-test-ca")
        other_ca = CertificateAuthority("someone-elses-ca")
        dir = tmp_path
        ca_file = ca.write(tmp_path / "ca.pem")
        other_ca_file = other_ca.write(tmp_path / "other-ca.pem")
        server_cert, server_key = ca.issue("server").write(tmp_path)
        client_cert, client_key = ca.issue("client", uris=("spiffe://deltarec/ranker",)).write(tmp_path)
        stranger_cert, stranger_key = other_ca.issue("stranger").write(tmp_path)
    return Pki


@pytest.fixture
def serve():
    started = []

    def start(environ: dict | None, rpcs_of: tuple[str, ...] = ()) -> GrpcService:
        server = start_server(load(SecurityConfig, environ) if environ is not None else None, rpcs_of)
        started.append(server)
        ADDRESS[0] = f"127.0.0.1:{server.port}"
        return server

    yield start
    for server in started:
        server.stop(0)


# ------------------------------------------------------------------------------ TLS

def test_tls_serves_verified_clients_and_refuses_plaintext_and_untrusting_clients(pki, serve):
    serve({"TLS_CERT_FILE": str(pki.server_cert), "TLS_KEY_FILE": str(pki.server_key)})
    with tls_client(pki.ca_file) as channel:
        assert who(channel) == "-"                     # TLS without a client certificate
    with grpc.insecure_channel(ADDRESS[0]) as plaintext:
        assert echo_status(plaintext) == grpc.StatusCode.UNAVAILABLE
    with tls_client(pki.other_ca_file) as untrusting:
        assert echo_status(untrusting) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_certificate_or_with_one_from_another_ca(pki, serve):
    serve({"TLS_CERT_FILE": str(pki.server_cert), "TLS_KEY_FILE": str(pki.server_key),
           "TLS_CLIENT_CA_FILE": str(pki.ca_file)})
    with tls_client(pki.ca_file, pki.client_cert, pki.client_key) as channel:
        assert who(channel) == "client"
    with tls_client(pki.ca_file) as no_certificate:
        assert echo_status(no_certificate) == grpc.StatusCode.UNAVAILABLE
    with tls_client(pki.ca_file, pki.stranger_cert, pki.stranger_key) as stranger:
        assert echo_status(stranger) == grpc.StatusCode.UNAVAILABLE


def test_server_certificate_rotation_reaches_new_connections_and_half_rotations_wait(pki, serve, tmp_path):
    """The server's files are rewritten with a certificate of a new CA: a client trusting only the
    new CA fails before and succeeds after, one trusting only the old CA the other way round."""
    live = tmp_path / "live"
    cert, key = pki.ca.issue("server-v1").write(live, "tls")
    server = serve({"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)})
    new_ca = CertificateAuthority("rotated-ca")
    new_ca_file = new_ca.write(tmp_path / "new-ca.pem")
    with tls_client(pki.ca_file) as channel:
        assert who(channel) == "-"
    with tls_client(new_ca_file) as channel:
        assert echo_status(channel) == grpc.StatusCode.UNAVAILABLE

    # Half a rotation (the certificate is new, its key not yet): the old pair stays in use.
    rotated = new_ca.issue("server-v2")
    cert.write_bytes(rotated.cert_pem)
    with tls_client(pki.ca_file) as channel:
        assert who(channel) == "-"
    assert server.certificates.reloads == 0

    rotated.write(live, "tls")
    with tls_client(new_ca_file) as channel:
        assert who(channel) == "-"
    with tls_client(pki.ca_file) as channel:
        assert echo_status(channel) == grpc.StatusCode.UNAVAILABLE
    assert server.certificates.reloads == 1


def test_client_certificate_rotation_rebuilds_the_channel(pki, serve, tmp_path, monkeypatch):
    """An internal client's channel (channels.ReloadingChannel) presents the rewritten
    certificate on its next call, and the server's client CA is reloaded too."""
    monkeypatch.setattr(channels, "RECHECK_S", 0.0)
    client_dir, server_dir = tmp_path / "client", tmp_path / "server"
    client_ca = pki.ca.write(server_dir / "client-ca.pem")
    serve({"TLS_CERT_FILE": str(pki.server_cert), "TLS_KEY_FILE": str(pki.server_key),
           "TLS_CLIENT_CA_FILE": str(client_ca)})
    cert, key = pki.ca.issue("client-v1").write(client_dir, "tls")
    # Read once, as a service reads its settings at start.
    settings = load(SecurityConfig, {"TLS_CA_FILE": str(pki.ca_file), "TLS_CERT_FILE": str(cert),
                                     "TLS_KEY_FILE": str(key)})
    channel = channels.make_channel(ADDRESS[0], ECHO, security=settings)
    try:
        assert who(channel) == "client-v1"
        # Both sides move to a new CA for client certificates.
        new_ca = CertificateAuthority("client-ca-v2")
        new_ca.write(client_ca)
        new_ca.issue("client-v2").write(client_dir, "tls")
        assert who(channel) == "client-v2"
        assert channel.rebuilds == 1
        with tls_client(pki.ca_file, pki.client_cert, pki.client_key) as old_client:
            assert echo_status(old_client) == grpc.StatusCode.UNAVAILABLE
        # Caught mid-rotation (a certificate without its key): the channel keeps working, and a
        # channel made now (a reconnecting consumer) uses the files last read instead of failing.
        (client_dir / "tls.crt").write_bytes(new_ca.issue("client-v3").cert_pem)
        assert who(channel) == "client-v2" and channel.rebuilds == 1
        with channels.make_channel(ADDRESS[0], ECHO, security=settings) as reconnecting:
            assert who(reconnecting) == "client-v2"
    finally:
        channel.close()


# ------------------------------------------------------------------------------ roles

@pytest.fixture
def guarded(pki, serve):
    return serve({"TLS_CERT_FILE": str(pki.server_cert), "TLS_KEY_FILE": str(pki.server_key),
                  "TLS_CLIENT_CA_FILE": str(pki.ca_file), "AUTH_ENABLED": "true", "AUTH_TOKENS": TOKEN_SETTING,
                  "AUTH_IDENTITIES": "spiffe://deltarec/ranker=service", "REFLECTION_ACCESS": "operator"},
                 rpcs_of=("*",))


def test_each_role_is_allowed_exactly_its_rpcs_and_refused_the_rest(pki, guarded):
    with tls_client(pki.ca_file, pki.client_cert, pki.client_key) as channel:
        outcomes = {}
        for service, methods in services_and_methods():
            for method in methods:
                full = f"/{service.full_name}/{method.name}"
                for role, token in TOKENS.items():
                    expected = (grpc.StatusCode.OK if role == auth.OPERATOR or role in auth.METHOD_ROLES[full]
                                else grpc.StatusCode.PERMISSION_DENIED)
                    outcomes[(full, role)] = (call(channel, service, method, token), expected)
        wrong = {key: value for key, value in outcomes.items() if value[0] != value[1]}
        assert not wrong, wrong
        # The roles the issue names, spelled out.
        assert outcomes[("/deltarec.v1.CollectorService/IngestEvents", "storefront")][0] == grpc.StatusCode.OK
        assert outcomes[("/deltarec.v1.CollectorService/Subscribe", "storefront")][0] == grpc.StatusCode.PERMISSION_DENIED
        assert outcomes[("/deltarec.v1.CollectorService/Subscribe", "service")][0] == grpc.StatusCode.OK
        assert outcomes[("/deltarec.v1.CollectorService/DropConsumerGroup", "service")][0] == \
            grpc.StatusCode.PERMISSION_DENIED
        assert outcomes[("/deltarec.v1.TrainerService/Train", "operator")][0] == grpc.StatusCode.OK
        assert outcomes[("/deltarec.v1.ConsistencyService/Rollback", "service")][0] == grpc.StatusCode.PERMISSION_DENIED


def test_credentials_are_required_health_stays_open_and_reflection_is_restricted(pki, guarded):
    features = next(service for service, _ in services_and_methods() if service.name == "FeaturesService")
    status = next(method for method in features.methods if method.name == "Status")
    train_service = next(service for service, _ in services_and_methods() if service.name == "TrainerService")
    train = next(method for method in train_service.methods if method.name == "Train")
    with tls_client(pki.ca_file, pki.client_cert, pki.client_key) as channel:
        # The certificate's identity (spiffe://deltarec/ranker) is the service role.
        assert call(channel, features, status) == grpc.StatusCode.OK
        assert call(channel, train_service, train) == grpc.StatusCode.PERMISSION_DENIED
        assert call(channel, features, status, "an-unknown-token-0123456789") == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        def list_services(token=None):
            metadata = (("authorization", f"Bearer {token}"),) if token else None
            responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=metadata)
            return [service.name for response in responses for service in response.list_services_response.service]
        assert "deltarec.v1.RankerService" in list_services(TOKENS[auth.OPERATOR])
        with pytest.raises(grpc.RpcError) as refused:
            list_services(TOKENS[auth.STOREFRONT])
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stranger_ca_server_cert, stranger_key = pki.ca.issue("nobody").write(pki.dir, "nobody")
    with tls_client(pki.ca_file, stranger_ca_server_cert, stranger_key) as unmapped:
        # A certificate from the right CA but with an identity that has no role.
        assert call(unmapped, features, status) == grpc.StatusCode.PERMISSION_DENIED
        assert call(unmapped, features, status, TOKENS[auth.SERVICE]) == grpc.StatusCode.OK


def test_tokens_over_plaintext_when_tls_is_off(serve):
    """Authentication does not depend on TLS (a mesh may provide it): the token is checked."""
    serve({"AUTH_ENABLED": "true", "AUTH_TOKENS": TOKEN_SETTING}, rpcs_of=("RankerService",))
    ranker = next(service for service, _ in services_and_methods() if service.name == "RankerService")
    recommend = next(method for method in ranker.methods if method.name == "Recommend")
    client = load(SecurityConfig, {"AUTH_CLIENT_TOKEN": TOKENS[auth.STOREFRONT]})
    with channels.make_channel(ADDRESS[0], channels.RANKER, security=client) as channel:
        assert call(channel, ranker, recommend) == grpc.StatusCode.OK
    with grpc.insecure_channel(ADDRESS[0]) as anonymous:
        assert call(anonymous, ranker, recommend) == grpc.StatusCode.UNAUTHENTICATED


def test_oversized_requests_and_metadata_are_refused_by_the_limits(serve):
    server = serve(None, rpcs_of=("RankerService",))
    ranker = next(service for service, _ in services_and_methods() if service.name == "RankerService")
    recommend = next(method for method in ranker.methods if method.name == "Recommend")
    assert server.limits == limits.SERVICE_LIMITS["deltarec.v1.RankerService"]
    with grpc.insecure_channel(ADDRESS[0]) as channel:
        big = channel.unary_unary(f"/{ranker.full_name}/{recommend.name}")
        with pytest.raises(grpc.RpcError) as refused:
            big(b"\n" + b"\xff\xff\xff\x03" + b"x" * (8 * 1024 * 1024), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as refused:
            big(b"", timeout=10, metadata=(("x-padding", "y" * 64 * 1024),))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert big(b"", timeout=10, metadata=(("x-padding", "y" * 8 * 1024),)) == b""   # within the limit


def test_a_delta_consumer_refused_for_its_token_keeps_retrying_and_heals_when_the_file_is_fixed(
        serve, tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "TOKEN_FILE_RECHECK_S", 0.0)
    serve({"AUTH_ENABLED": "true", "AUTH_TOKENS": TOKEN_SETTING}, rpcs_of=("CollectorService",))
    token_file = tmp_path / "token"
    token_file.write_text(TOKENS[auth.STOREFRONT])           # the wrong role for Subscribe
    consumer = DeltaConsumer(ADDRESS[0], "features", lambda batch: None, reconnect_backoff_s=0.05,
                             security=load(SecurityConfig, {"AUTH_CLIENT_TOKEN_FILE": str(token_file)}))
    CALLED.clear()
    consumer.start()
    try:
        wait_until(lambda: consumer.reconnects >= 3, "the refused consumer to retry", timeout_s=30)
        assert consumer.error is None and "/deltarec.v1.CollectorService/Subscribe" not in CALLED
        fixed = tmp_path / "token.new"
        fixed.write_text(TOKENS[auth.SERVICE])
        fixed.replace(token_file)
        wait_until(lambda: "/deltarec.v1.CollectorService/Subscribe" in CALLED, "the consumer to get in",
                   timeout_s=30)
    finally:
        consumer.stop()


def test_reflection_can_be_switched_off(serve):
    serve({"REFLECTION_ACCESS": "off"}, rpcs_of=("RankerService",))
    with grpc.insecure_channel(ADDRESS[0]) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
