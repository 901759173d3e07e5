"""The shared edge, in process (no infrastructure): unparsable requests, callers that go away,
status messages that would echo a huge input, and reflection that describes methods."""
from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from deltarec.v1 import features_pb2, features_pb2_grpc
from services.common.errors import InvalidArgument, grpc_errors
from services.common.interceptors import CLIENT_ENDED
from services.common.server import GrpcService

SERVICE = "deltarec.v1.FeaturesService"
GRPCURL = str(Path(sys.executable).parent / "grpcurl")


class Fake(features_pb2_grpc.FeaturesServiceServicer):
    def __init__(self) -> None:
        self.stream_ended = threading.Event()

    @grpc_errors
    def GetUserFeatures(self, request, context):
        raise InvalidArgument(f"user_id: unknown {request.user_id}")   # echoes: bounded by the edge

    @grpc_errors
    def WatchItems(self, request, context):
        try:
            while True:
                time.sleep(0.01)
                if not context.is_active():
                    raise RuntimeError("the store failed after the caller left")
                yield features_pb2.WatchItemsResponse(watermark=1)
        finally:
            self.stream_ended.set()


@pytest.fixture
def served():
    fake = Fake()
    service = GrpcService("edge-test", [SERVICE], port=0, metrics_port=None)
    features_pb2_grpc.add_FeaturesServiceServicer_to_server(fake, service.server)
    service.start()
    service.set_ready()
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    yield service, fake, channel
    channel.close()
    service.stop(0)


def errors_logged(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_garbage_bytes_are_invalid_argument_and_no_error_is_logged(served, caplog):
    _, _, channel = served
    raw = channel.unary_unary(f"/{SERVICE}/GetUserFeatures")
    before = CLIENT_ENDED.labels(SERVICE, "GetUserFeatures", "malformed")._value.get()
    for payload in (b"\xff\xff\xff\xff", b"\x0a\x02\xc3\x28"):   # bad wire format; invalid UTF-8
        with pytest.raises(grpc.RpcError) as info:
            raw(payload, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid deltarec.v1.GetUserFeaturesRequest message" in info.value.details()
    assert CLIENT_ENDED.labels(SERVICE, "GetUserFeatures", "malformed")._value.get() == before + 2
    assert errors_logged(caplog) == []


def test_a_status_never_echoes_a_megabyte(served):
    _, _, channel = served
    stub = features_pb2_grpc.FeaturesServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetUserFeatures(features_pb2.GetUserFeaturesRequest(user_id="u" * 1_000_000), timeout=10)
    # Not RESOURCE_EXHAUSTED from an over-long trailer: the handler's own code, a short message.
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(info.value.details()) <= 1024


def test_a_stream_whose_deadline_passes_is_counted_not_logged_as_an_error(served, caplog):
    _, fake, channel = served
    stub = features_pb2_grpc.FeaturesServiceStub(channel)
    before = CLIENT_ENDED.labels(SERVICE, "WatchItems", "deadline_exceeded")._value.get()
    with pytest.raises(grpc.RpcError) as info:
        for _ in stub.WatchItems(features_pb2.WatchItemsRequest(), timeout=0.3):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert fake.stream_ended.wait(10)
    deadline = time.monotonic() + 10
    while CLIENT_ENDED.labels(SERVICE, "WatchItems", "deadline_exceeded")._value.get() == before:
        assert time.monotonic() < deadline, "the expired stream was not counted"
        time.sleep(0.02)
    assert errors_logged(caplog) == []


def test_grpcurl_describes_a_method_through_reflection(served, tmp_path):
    service, _, _ = served
    result = subprocess.run([GRPCURL, "-plaintext", f"127.0.0.1:{service.port}", "describe",
                             f"{SERVICE}.GetUserFeatures"], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "is a method" in result.stdout and "GetUserFeaturesRequest" in result.stdout
