"""Client-side load balancing of service-to-service channels (services/common/channels.py).

In Kubernetes a headless Service resolves to one address per ready pod; the clients' channels
must then spread calls over all of them instead of pinning every call to the first pod. Here
the addresses are real gRPC servers on loopback (the services' own bootstrap, GrpcService),
named by an `ipv4:` address list — what the dns:/// resolver hands the channel for a headless
Service — and, where the machine has IPv6 loopback, by a real `dns:///localhost:PORT` name.
"""
from __future__ import annotations

import collections
import os
import re
import socket
import subprocess
import sys

import grpc
import pytest

from deltarec.v1 import features_pb2, features_pb2_grpc, ranker_pb2, ranker_pb2_grpc
from services.common.channels import PooledChannel, client_channel, make_channel, split_targets
from services.common.config import GRPC_TARGET
from services.common.server import GrpcService
from services.ranker.features_client import FeaturesClient
from tests.support import wait_until


class NamedRanker(ranker_pb2_grpc.RankerServiceServicer):
    def __init__(self, name: str) -> None:
        self.name = name

    def Status(self, request, context):
        return ranker_pb2.RankerServiceStatusResponse(replica_id=self.name)


class PeerEcho(ranker_pb2_grpc.RankerServiceServicer):
    """Answers with the caller's address: one `ip:port` per client TCP connection."""

    def Status(self, request, context):
        return ranker_pb2.RankerServiceStatusResponse(replica_id=context.peer())


class CountingFeatures(features_pb2_grpc.FeaturesServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    def GetUserFeatures(self, request, context):
        self.calls += 1
        return features_pb2.GetUserFeaturesResponse(data_lsn=7)


def _server(name: str, add, servicer, port: int = 0, host: str = "127.0.0.1") -> GrpcService:
    service = GrpcService(name, [], port=port, metrics_port=None, workers=4, grace_s=0, host=host)
    add(servicer, service.server)
    service.start()
    service.set_ready()
    return service


@pytest.fixture
def rankers():
    services = [_server(f"r{i}", ranker_pb2_grpc.add_RankerServiceServicer_to_server, NamedRanker(f"r{i}"))
                for i in range(3)]
    yield services
    for service in services:
        service.stop(0)


def _answers(channel: grpc.Channel, calls: int) -> collections.Counter:
    stub = ranker_pb2_grpc.RankerServiceStub(channel)
    return collections.Counter(
        stub.Status(ranker_pb2.RankerServiceStatusRequest(), timeout=5, wait_for_ready=True).replica_id
        for _ in range(calls))


def _connected_to_all(channel: grpc.Channel, names: set[str]) -> None:
    """round_robin only uses subchannels that are ready: wait until every replica answered once."""
    seen: set[str] = set()
    wait_until(lambda: seen.update(_answers(channel, 3)) or seen >= names, "every replica connected", 30)


def test_round_robin_spreads_calls_over_every_replica(rankers):
    target = "ipv4:" + ",".join(f"127.0.0.1:{service.port}" for service in rankers)
    channel = client_channel(target)
    _connected_to_all(channel, {"r0", "r1", "r2"})
    counts = _answers(channel, 300)
    # round_robin takes the ready subchannels in turn: an even split (a drop of one replica's
    # connection mid-run would move at most a few calls).
    assert set(counts) == {"r0", "r1", "r2"}
    assert min(counts.values()) >= 90, counts
    channel.close()


def test_default_policy_would_pin_every_call_to_one_replica(rankers):
    """Why the helper exists: gRPC's default pick_first sends a channel's calls to one address."""
    target = "ipv4:" + ",".join(f"127.0.0.1:{service.port}" for service in rankers)
    channel = grpc.insecure_channel(target)
    counts = _answers(channel, 60)
    assert len(counts) == 1, counts
    channel.close()


def test_a_replica_that_goes_away_is_skipped(rankers):
    target = "ipv4:" + ",".join(f"127.0.0.1:{service.port}" for service in rankers)
    channel = client_channel(target)
    _connected_to_all(channel, {"r0", "r1", "r2"})
    rankers[1].stop(0)
    # Calls in the moment of the disconnect may still pick it; after that none do.
    wait_until(lambda: "r1" not in _answers(channel, 6), "the stopped replica left the rotation", 30)
    counts = _answers(channel, 100)
    assert set(counts) == {"r0", "r2"} and min(counts.values()) >= 40, counts
    channel.close()


def test_ranker_to_features_client_balances_over_features_replicas():
    """The ranker's own client (FeaturesClient over make_channel) with a multi-address target."""
    servicers = [CountingFeatures() for _ in range(3)]
    services = [_server(f"f{i}", features_pb2_grpc.add_FeaturesServiceServicer_to_server, servicer)
                for i, servicer in enumerate(servicers)]
    try:
        client = FeaturesClient("ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in services), timeout_s=5)
        wait_until(lambda: client.user_history("u", 5, None) and all(s.calls for s in servicers),
                   "every features replica called", 30)
        before = [s.calls for s in servicers]
        for _ in range(150):
            assert client.user_history("u", 5, None).data_lsn == 7
        spread = [s.calls - b for s, b in zip(servicers, before)]
        assert sum(spread) == 150 and min(spread) >= 45, spread
        client.close()
    finally:
        for service in services:
            service.stop(0)


def test_a_pooled_channel_opens_its_connections_and_takes_them_in_turn():
    """connections=N: N TCP connections to one address, each call on the next (the server sees
    N peers, each with an equal share); a plain channel is one connection."""
    service = _server("peer", ranker_pb2_grpc.add_RankerServiceServicer_to_server, PeerEcho())
    address = f"127.0.0.1:{service.port}"
    try:
        pooled = make_channel(address, "deltarec.v1.RankerService", security=None, connections=4)
        assert isinstance(pooled, PooledChannel) and len(pooled.channels) == 4
        counts = _answers(pooled, 40)
        assert len(counts) == 4 and set(counts.values()) == {10}, counts
        plain = make_channel(address, "deltarec.v1.RankerService", security=None)
        assert len(_answers(plain, 20)) == 1
        pooled.close()
        plain.close()
    finally:
        service.stop(0)


def test_a_pooled_channel_reaches_every_process_of_a_shared_port():
    """Two servers on one SO_REUSEPORT port, as a ranker's RANKER_WORKERS processes are: the
    kernel gives each connection to one of them, so one connection reaches one process and 16
    connections reach both (all 16 landing on one of two: p = 2^-15)."""
    first = _server("w0", ranker_pb2_grpc.add_RankerServiceServicer_to_server, NamedRanker("w0"))
    first.stop(0)
    port = first.port
    services = []
    try:
        for name in ("w0", "w1"):
            service = GrpcService(name, [], port=port, metrics_port=None, workers=4, grace_s=0, reuse_port=True)
            ranker_pb2_grpc.add_RankerServiceServicer_to_server(NamedRanker(name), service.server)
            service.start()
            service.set_ready()
            services.append(service)
        plain = make_channel(f"127.0.0.1:{port}", "deltarec.v1.RankerService", security=None)
        assert len(_answers(plain, 30)) == 1
        pooled = make_channel(f"127.0.0.1:{port}", "deltarec.v1.RankerService", security=None, connections=16)
        counts = _answers(pooled, 160)
        assert set(counts) == {"w0", "w1"}, counts
        plain.close()
        pooled.close()
    finally:
        for service in services:
            service.stop(0)


@pytest.mark.parametrize("connections", [0, -1, 65])
def test_connections_outside_the_bound_are_refused(connections):
    with pytest.raises(ValueError, match="connections"):
        make_channel("127.0.0.1:1", "deltarec.v1.RankerService", security=None, connections=connections)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return any(info[0] == socket.AF_INET6 for info in socket.getaddrinfo("localhost", 80))
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback: localhost has one address only")
def test_dns_target_balances_over_every_address_of_the_name():
    """dns:///localhost:PORT resolves to 127.0.0.1 and ::1: two replicas on one port, as a
    headless Service's name resolves to several pod IPs on one port."""
    first = _server("a", ranker_pb2_grpc.add_RankerServiceServicer_to_server, NamedRanker("v4"), host="127.0.0.1")
    try:
        second = _server("b", ranker_pb2_grpc.add_RankerServiceServicer_to_server, NamedRanker("v6"),
                         port=first.port, host="[::1]")
    except RuntimeError:
        first.stop(0)
        pytest.skip("could not bind [::1] on the same port")
    try:
        channel = client_channel(f"dns:///localhost:{first.port}")
        _connected_to_all(channel, {"v4", "v6"})
        counts = _answers(channel, 100)
        assert min(counts.values()) >= 40, counts
        channel.close()
    finally:
        first.stop(0)
        second.stop(0)


@pytest.mark.parametrize("resolver", ["native", "ares"])
def test_a_dns_name_target_resolves_with_either_resolver(resolver):
    """dns:///NAME:PORT resolves through gRPC's resolver (the ConfigMap picks `native`, which
    follows the pod's DNS search path); a name with an address nobody listens on (::1 here) is
    skipped while another answers."""
    code = (
        "import sys\n"
        "from deltarec.v1 import ranker_pb2, ranker_pb2_grpc\n"
        "from services.common.channels import client_channel\n"
        "stub = ranker_pb2_grpc.RankerServiceStub(client_channel(sys.argv[1]))\n"
        "print(stub.Status(ranker_pb2.RankerServiceStatusRequest(), timeout=10, wait_for_ready=True).replica_id)\n")
    service = _server("one", ranker_pb2_grpc.add_RankerServiceServicer_to_server, NamedRanker("only"))
    try:
        result = subprocess.run([sys.executable, "-c", code, f"dns:///localhost:{service.port}"], capture_output=True,
                                text=True, timeout=60, env={**os.environ, "GRPC_DNS_RESOLVER": resolver})
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == "only"
    finally:
        service.stop(0)


@pytest.mark.parametrize("value, targets", [
    ("collector:8080", ["collector:8080"]),
    ("dns:///collector.deltarec.svc:8080", ["dns:///collector.deltarec.svc:8080"]),
    ("127.0.0.1:1, 127.0.0.1:2", ["127.0.0.1:1", "127.0.0.1:2"]),
    ("ipv4:127.0.0.1:1,127.0.0.1:2", ["ipv4:127.0.0.1:1,127.0.0.1:2"]),
])
def test_targets_split_into_alternatives(value, targets):
    assert split_targets(value) == targets


@pytest.mark.parametrize("value, valid", [
    ("collector:8080", True), ("dns:///collector:8080", True), ("ipv4:10.0.0.1:80,10.0.0.2:80", True),
    ("a:1,dns:///b:2", True), ("http://collector:8080", False), ("collector", False), ("", False),
])
def test_target_setting_pattern(value, valid):
    assert bool(re.fullmatch(GRPC_TARGET, value)) is valid
