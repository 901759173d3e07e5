"""HEALTH_PORT: with TLS and mutual TLS on the gRPC port, kubelet's gRPC probe (plaintext, no
certificate) gets a port of its own serving the same health status and nothing else; on the
services' own bootstrap (GrpcService from settings) over real gRPC on loopback."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scripts.pki import CertificateAuthority
from services.common.config import CommonConfig, load
from services.common.server import GrpcService

pytestmark = pytest.mark.integration


def health(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def test_the_plaintext_health_port_follows_health_and_serves_nothing_else(tmp_path):
    ca = CertificateAuthority("probe-ca")
    cert, key = ca.issue("collector").write(tmp_path, "collector")
    ca_file = ca.write(tmp_path / "ca.pem")
    config = load(CommonConfig, {"DATABASE_URL": "postgresql+psycopg2://u@h/d", "TLS_CERT_FILE": str(cert),
                                 "TLS_KEY_FILE": str(key), "TLS_CLIENT_CA_FILE": str(ca_file),
                                 "AUTH_ENABLED": "true", "AUTH_IDENTITIES": "spiffe://deltarec/x=service",
                                 "HEALTH_PORT": "0", "METRICS_PORT": "0"})
    service = GrpcService.from_config("probe-test", ["deltarec.v1.CollectorService"], config)
    service.start()
    try:
        assert service.health_port and service.health_port != service.port
        assert health(service.health_port) == "NOT_SERVING"          # not ready yet
        service.set_ready()
        assert health(service.health_port) == "SERVING"
        assert health(service.port) == "UNAVAILABLE"                 # the main port is mTLS only
        with grpc.insecure_channel(f"127.0.0.1:{service.health_port}") as channel:
            with pytest.raises(grpc.RpcError) as other:
                channel.unary_unary("/deltarec.v1.CollectorService/ListConsumerGroups")(b"", timeout=5)
            assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as reflection:
                channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(
                    iter([b""]), timeout=5).__next__()
            assert reflection.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        service.metrics.close()
        service.stop(0)
    assert health(service.health_port) == "UNAVAILABLE"             # gone with the service


def test_no_health_port_unless_asked():
    config = load(CommonConfig, {"DATABASE_URL": "postgresql+psycopg2://u@h/d"})
    assert config.health_port == -1
    service = GrpcService.from_config("probe-test", [], config)
    try:
        assert service.health_server is None and service.health_port is None
    finally:
        service.metrics.close()
        service.stop(0)
