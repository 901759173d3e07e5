"""What TLS, mutual TLS and the role check cost per call.

The services' own bootstrap (GrpcService with a SecurityConfig) serves a Recommend-shaped call
(a RecommendRequest in, a 10-item RecommendResponse out, answered without work) and clients built
by channels.make_channel call it from 8 threads over loopback, for each configuration:
plaintext without authentication (the reference: today's default), TLS, mutual TLS, and mutual
TLS with bearer-token authentication and the role check. Connections are set up before timing
(handshakes are per connection, not per call); rounds interleave the configurations. Certificates come from a CA made at run time.

    python bench/security.py [--quick] [--seconds S] [--concurrency N]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import _harness

import grpc  # noqa: E402

from deltarec.v1 import common_pb2, ranker_pb2  # noqa: E402
from services.common import channels  # noqa: E402
from services.common.config import SecurityConfig, load  # noqa: E402
from services.common.server import GrpcService  # noqa: E402
from scripts.pki import CertificateAuthority  # noqa: E402

RANKER = "deltarec.v1.RankerService"
TOKEN = "storefront-bench-token-0123456789"
RESPONSE = ranker_pb2.RecommendResponse(
    items=[ranker_pb2.ScoredItem(item_id=f"B00ITEM{n:05d}", score=1.0 / (n + 1), title=f"Rose Lip Balm {n}",
                                 reason="because you bought Rose Lip Balm") for n in range(10)],
    freshness=common_pb2.Freshness(model_version=7, data_lsn=123456),
    variant=ranker_pb2.Variant(name="current", model_version=7)).SerializeToString()
REQUEST = ranker_pb2.RecommendRequest(user_id="u-bench", k=10).SerializeToString()


def serve(security: SecurityConfig | None) -> GrpcService:
    service = GrpcService("bench-security", [RANKER], metrics_port=None, grace_s=0, security=security)
    service.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RANKER, {
        "Recommend": grpc.unary_unary_rpc_method_handler(lambda request, context: RESPONSE)}),))
    service.start()
    return service


def connect(service: GrpcService, client: SecurityConfig | None):
    channel = channels.make_channel(f"127.0.0.1:{service.port}", RANKER, security=client)
    call = channel.unary_unary(f"/{RANKER}/Recommend")
    for _ in range(50):                               # connect (handshake) and warm up
        call(REQUEST, timeout=10)
    return channel, call


def measure(call, seconds: float, concurrency: int) -> list[float]:
    """Latencies of the calls made by `concurrency` threads in `seconds`."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def worker(mine: list[float]) -> None:
        start.wait()
        while True:
            began = time.perf_counter()
            if began >= deadline[0]:
                return
            call(REQUEST, timeout=10)
            mine.append(time.perf_counter() - began)

    threads = [threading.Thread(target=worker, args=(mine,)) for mine in latencies]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    start.wait()
    for thread in threads:
        thread.join()
    return [value for mine in latencies for value in mine]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds of 1 s per configuration")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="per configuration and round")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 15)
    seconds = args.seconds or (1.0 if args.quick else 2.0)

    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        ca = CertificateAuthority("bench-ca")
        ca_file = str(ca.write(directory / "ca.pem"))
        server_cert, server_key = (str(path) for path in ca.issue("server").write(directory))
        client_cert, client_key = (str(path) for path in ca.issue("client").write(directory))
        tls = {"TLS_CERT_FILE": server_cert, "TLS_KEY_FILE": server_key}
        mtls = {**tls, "TLS_CLIENT_CA_FILE": ca_file}
        client_tls = {"TLS_CA_FILE": ca_file}
        client_mtls = {**client_tls, "TLS_CERT_FILE": client_cert, "TLS_KEY_FILE": client_key}
        configurations = {
            "plaintext": (None, None),
            "tls": (tls, client_tls),
            "mtls": (mtls, client_mtls),
            "mtls_token_roles": ({**mtls, "AUTH_ENABLED": "true", "AUTH_TOKENS": f"storefront:shop:{TOKEN}"},
                                 {**client_mtls, "AUTH_CLIENT_TOKEN": TOKEN}),
        }
        servers, clients = {}, {}
        try:
            for name, (server_settings, client_settings) in configurations.items():
                servers[name] = serve(load(SecurityConfig, server_settings) if server_settings else None)
                clients[name] = connect(servers[name],
                                        load(SecurityConfig, client_settings) if client_settings else None)
            # Rounds interleave the configurations, so the load of the shared machine falls on
            # all of them alike; the figure of a configuration is its median round.
            rates: dict[str, list[float]] = {name: [] for name in configurations}
            cpu_per_call: dict[str, list[float]] = {name: [] for name in configurations}
            latencies: dict[str, list[float]] = {name: [] for name in configurations}
            for round_number in range(rounds):
                for name, (_, call) in clients.items():
                    cpu_before = time.process_time()
                    found = measure(call, seconds, args.concurrency)
                    # Client and server share this process: its CPU time per call is what one
                    # call costs both ends, much less sensitive to the shared machine's load.
                    cpu_per_call[name].append((time.process_time() - cpu_before) / max(len(found), 1))
                    rates[name].append(len(found) / seconds)
                    latencies[name] += found
                _harness.progress(f"round {round_number + 1}/{rounds}: " + ", ".join(
                    f"{name} {rates[name][-1]:.0f}/s" for name in configurations))
        finally:
            for channel, _ in clients.values():
                channel.close()
            for service in servers.values():
                service.stop(0)

    results = {name: {"calls_per_s": round(statistics.median(rates[name]), 1),
                      "cpu_us_per_call": round(statistics.median(cpu_per_call[name]) * 1e6, 1),
                      "latency_ms": _harness.percentiles(latencies[name], scale=1000)} for name in configurations}
    reference = results["plaintext"]["calls_per_s"]
    _harness.print_summary({
        "benchmark": "security", "quick": args.quick, "rounds": rounds, "seconds_per_round": seconds,
        "concurrency": args.concurrency, "reference": "plaintext, no authentication (same server, same run)",
        "results": results,
        "ratio_to_plaintext": {name: _harness.ratio(result["calls_per_s"], reference)
                               for name, result in results.items()},
        "cpu_per_call_ratio_to_plaintext": {
            name: _harness.ratio(result["cpu_us_per_call"], results["plaintext"]["cpu_us_per_call"])
            for name, result in results.items()},
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
