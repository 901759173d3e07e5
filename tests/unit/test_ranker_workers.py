"""services/ranker/workers.py: worker names, ports, environment, the restart policy and the
shared-port reservation (real sockets)."""
import socket

import pytest

from services.common.config import ConfigError, load
from services.ranker.config import RankerConfig, check_settings
from services.ranker.workers import (RestartPolicy, check_worker_settings, offset_port, reserve_shared_port,
                                     worker_environment, worker_replica_id)

MINIMAL = {"DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1:5432/deltarec",
           "FEATURES_ADDRESS": "127.0.0.1:50052"}


def settings(**environ):
    config = load(RankerConfig, {**MINIMAL, **environ})
    check_settings(config)
    return config


def test_one_worker_is_todays_single_process():
    config = settings()
    assert config.workers == 1 and config.worker_index == -1
    assert not config.reuse_port and config.own_port is None


def test_a_worker_shares_its_port_and_has_its_own():
    config = settings(RANKER_WORKER_INDEX="1", RANKER_WORKER_GRPC_PORT="0")
    assert config.reuse_port and config.own_port == 0


def test_worker_ids_and_ports():
    assert worker_replica_id("ranker-0", 3) == "ranker-0-w3"
    assert offset_port(9090, 2) == 9092 and offset_port(0, 2) == 0


def test_worker_environment():
    env = worker_environment(1, 2, base_id="pod-a", grpc_port=8080, health_port=-1, metrics_port=9090,
                             worker_grpc_port=0)
    assert env == {"RANKER_WORKERS": "1", "RANKER_WORKER_INDEX": "1", "RANKER_REPLICA_ID": "pod-a-w1",
                   "GRPC_PORT": "8080", "METRICS_PORT": "9091", "RANKER_WORKER_GRPC_PORT": "0"}
    with_health = worker_environment(0, 2, base_id="pod-a", grpc_port=8080, health_port=8081,
                                     metrics_port=0, worker_grpc_port=7000)
    assert with_health["HEALTH_PORT"] == "8081" and with_health["METRICS_PORT"] == "0"
    assert with_health["RANKER_WORKER_GRPC_PORT"] == "7000"


@pytest.mark.parametrize("environ, message", [
    ({"RANKER_WORKERS": "0"}, "RANKER_WORKERS=0: must be >= 1"),
    ({"RANKER_WORKERS": "65"}, "RANKER_WORKERS=65: must be <= 64"),
    ({"RANKER_WORKERS": "two"}, "RANKER_WORKERS='two': expected int"),
])
def test_bad_worker_counts_are_refused_by_name(environ, message):
    with pytest.raises(ConfigError, match=message):
        settings(**environ)


def test_worker_settings_that_do_not_fit_are_refused():
    with pytest.raises(ConfigError, match="METRICS_PORT=65535"):
        settings(RANKER_WORKERS="2", METRICS_PORT="65535")
    with pytest.raises(ConfigError, match="RANKER_REPLICA_ID: at most 125"):
        settings(RANKER_WORKERS="2", RANKER_REPLICA_ID="r" * 126)
    with pytest.raises(ConfigError, match="overlap GRPC_PORT"):
        settings(RANKER_WORKERS="2", GRPC_PORT="8081", RANKER_WORKER_GRPC_PORT="8080")
    with pytest.raises(ConfigError, match="overlap their metrics ports"):
        settings(RANKER_WORKERS="2", METRICS_PORT="9090", RANKER_WORKER_GRPC_PORT="9091")
    with pytest.raises(ConfigError, match="RANKER_WORKER_INDEX is set by the supervisor"):
        settings(RANKER_WORKERS="2", RANKER_WORKER_INDEX="0")
    # one worker: nothing to derive, nothing to check
    check_worker_settings(1, replica_id="r" * 128, metrics_port=65535, worker_grpc_port=65535,
                          grpc_port=65535, health_port=-1)
    assert settings(RANKER_WORKERS="4", METRICS_PORT="9090", GRPC_PORT="8080").workers == 4


def test_restart_policy_backs_off_resets_after_a_stable_run_and_gives_up():
    policy = RestartPolicy(first_backoff_s=1.0, max_backoff_s=5.0, stable_after_s=60.0, max_failures=5)
    failures, delays = 0, []
    for _ in range(4):
        failures = policy.failures_after(failures, ran_s=2.0)
        delays.append(policy.decide(failures, returncode=1))
    assert delays == [1.0, 2.0, 4.0, 5.0]
    assert policy.decide(policy.failures_after(failures, ran_s=2.0), returncode=-9) is None   # the 5th
    assert policy.failures_after(failures, ran_s=61.0) == 1          # it had served a while
    assert policy.decide(1, returncode=-9) == 1.0
    assert policy.decide(1, returncode=2) is None                    # a config error does not heal


def test_a_reserved_port_admits_reuseport_listeners_only():
    holder = reserve_shared_port("127.0.0.1", 0)
    try:
        port = holder.getsockname()[1]
        plain = socket.socket()
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))              # a process without SO_REUSEPORT: refused
        plain.close()
        with pytest.raises(OSError, match="could not bind gRPC port"):
            reserve_shared_port("127.0.0.1", port)       # a second supervisor: refused
        listeners = []
        for _ in range(2):                               # the workers
            worker = socket.socket()
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            listeners.append(worker)
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.close()
        for worker in listeners:
            worker.close()
    finally:
        holder.close()


def test_a_port_in_use_is_a_conflict():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError, match="could not bind gRPC port"):
            reserve_shared_port("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_grpc_service_shares_a_port_only_when_asked():
    from services.common.server import GrpcService
    holder = reserve_shared_port("127.0.0.1", 0)
    port = holder.getsockname()[1]
    servers = []
    try:
        for _ in range(2):       # two workers on the shared port, each with a port of its own too
            servers.append(GrpcService("t", ["deltarec.v1.RankerService"], port=port, metrics_port=None,
                                       reuse_port=True, own_port=0))
        assert servers[0].port == servers[1].port == port
        assert servers[0].own_port not in (None, port, servers[1].own_port)
        with pytest.raises(RuntimeError, match="[Ff]ailed to bind|could not bind"):
            GrpcService("t", ["deltarec.v1.RankerService"], port=port, metrics_port=None)   # today's default
    finally:
        for server in servers:
            server.server.stop(0)
        holder.close()


def test_a_restart_within_time_wait_of_the_last_connections_is_not_a_conflict():
    import time
    holder = reserve_shared_port("127.0.0.1", 0)
    port = holder.getsockname()[1]
    worker = socket.socket()              # as gRPC listens: SO_REUSEADDR and SO_REUSEPORT
    worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    worker.bind(("127.0.0.1", port))
    worker.listen()
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    accepted, _ = worker.accept()
    accepted.close()                      # the server side closes first: its end in TIME_WAIT
    time.sleep(0.05)
    client.close()
    worker.close()
    holder.close()
    reserve_shared_port("127.0.0.1", port).close()     # the ranker started again on its port
