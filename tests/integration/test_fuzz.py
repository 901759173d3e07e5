"""Fuzzing every RPC of every service with hostile values (hypothesis), against the real processes.

Requests are generated from the proto descriptors, so a new field is fuzzed without a change
here: strings with NUL and other control characters, huge strings and lists, extreme integers
of each field's width, NaN and infinities, unknown enum numbers, timestamps out of range; plus
raw bytes that are not a valid message (invalid UTF-8 in a string field), deadlines of 1 ms and
cancelled streams. Every answer must be OK or a precise status — never INTERNAL or UNKNOWN, no
traceback in any detail, no detail longer than the cap — and afterwards every service still
answers and none logged an ERROR.
"""
from __future__ import annotations

import re
import shutil
import uuid

import grpc
import pytest
from google.protobuf import descriptor, message_factory
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from deltarec.v1 import collector_pb2, consistency_pb2, features_pb2, ranker_pb2, trainer_pb2
from scripts.drills import DrillStack
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

# UNIMPLEMENTED is precise too (a method of the proto that a server of this build does not
# serve), and so is ABORTED (the trainer is busy with a job an earlier example started).
PRECISE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.ABORTED}
MAX_DETAIL = 1024
GROUP_NAME = re.compile(r"[a-z][a-z0-9_]{0,40}")

SERVICES = {  # proto service -> (which process serves it, the _pb2 module)
    "deltarec.v1.CollectorService": ("collector", collector_pb2),
    "deltarec.v1.FeaturesService": ("features", features_pb2),
    "deltarec.v1.TrainerService": ("trainer", trainer_pb2),
    "deltarec.v1.RankerService": ("ranker", ranker_pb2),
    "deltarec.v1.ConsistencyService": ("consistency", consistency_pb2),
}
METHODS = [(service, method) for service, (_, module) in SERVICES.items()
           for method in (m.name for m in module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]].methods)]

FD = descriptor.FieldDescriptor
INT_RANGES = {FD.TYPE_UINT32: (0, 2 ** 32 - 1), FD.TYPE_UINT64: (0, 2 ** 64 - 1),
              FD.TYPE_INT32: (-2 ** 31, 2 ** 31 - 1), FD.TYPE_INT64: (-2 ** 63, 2 ** 63 - 1),
              FD.TYPE_SINT32: (-2 ** 31, 2 ** 31 - 1), FD.TYPE_SINT64: (-2 ** 63, 2 ** 63 - 1),
              FD.TYPE_FIXED32: (0, 2 ** 32 - 1), FD.TYPE_FIXED64: (0, 2 ** 64 - 1)}

hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(max_codepoint=0x9f), max_size=20),              # control characters
    st.sampled_from(["", " ", "\x00", "a\x00b", "\x1b[31m", "\u202e", "x" * 129, "é" * 65,
                     "features", "trainer", "recency", "drill-item-1"]),
    st.integers(1_000, 1_100_000).map(lambda n: "y" * n),                 # up to 1.1 MB
)


def hostile_int(low: int, high: int):
    edges = [v for v in (0, 1, 2, 7, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 53 + 1, 2 ** 63 - 1,
                         2 ** 63, 2 ** 64 - 1, -1, -2 ** 31, -2 ** 63) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


hostile_double = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e308, -1e308, 5e-324]),
                           st.floats(allow_nan=True, allow_infinity=True))


def value_of(field: descriptor.FieldDescriptor, depth: int):
    if field.type == FD.TYPE_STRING:
        return hostile_text
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return hostile_double if field.type == FD.TYPE_DOUBLE else st.floats(width=32)
    if field.type == FD.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-3, 1000))
    if field.type in INT_RANGES:
        return hostile_int(*INT_RANGES[field.type])
    return message_of(field.message_type, depth + 1)


@st.composite
def message_of(draw, message_type: descriptor.Descriptor, depth: int = 0):
    message = message_factory.GetMessageClass(message_type)()
    if depth > 2:
        return message
    for field in message_type.fields:
        if not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            entries = draw(st.dictionaries(value_of(key_field, depth), value_of(value_field, depth), max_size=3))
            target = getattr(message, field.name)
            for key, value in entries.items():
                if value_field.message_type is not None:
                    target[key].CopyFrom(value)
                else:
                    target[key] = value
            continue
        is_repeated = field.is_repeated
        if is_repeated:
            count = draw(st.sampled_from([0, 1, 2, 3, 1001, 20_001]))
            if count > 3:     # a huge list of small entries (a huge list of huge ones is only larger)
                small = {FD.TYPE_STRING: lambda i: f"v{i}", FD.TYPE_BOOL: lambda i: True,
                         FD.TYPE_DOUBLE: float, FD.TYPE_FLOAT: float, FD.TYPE_BYTES: lambda i: b"b"}
                if field.message_type is not None:
                    empty = message_factory.GetMessageClass(field.message_type)()
                    values = [empty] * count
                else:
                    values = [small.get(field.type, int)(i) for i in range(count)]
            else:
                values = draw(st.lists(value_of(field, depth), min_size=count, max_size=count))
            target = getattr(message, field.name)
            if field.message_type is not None:
                for value in values:
                    target.add().CopyFrom(value)
            else:
                target.extend(values)
        else:
            value = draw(value_of(field, depth))
            if field.message_type is not None:
                getattr(message, field.name).CopyFrom(value)
            else:
                setattr(message, field.name, value)
    return message


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = REPO_ROOT / ".run" / f"test-fuzz-{uuid.uuid4().hex[:8]}"
    stack = DrillStack(state, items=30, service_env={"trainer": {"TRAINER_MAX_EPOCHS": "3"}},
                       log_dir=tmp_path_factory.mktemp("logs"), consistency=True)
    try:
        stack.start()
        stack.wait_serving()
        yield stack
    finally:
        stack.close()
        shutil.rmtree(state, ignore_errors=True)


def method_of(service: str, name: str):
    process, module = SERVICES[service]
    method = module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]].methods_by_name[name]
    return process, method


def check_status(code: grpc.StatusCode, details: str, where: str, allowed=PRECISE) -> None:
    assert code in allowed, f"{where}: {code.name}: {details[:300]}"
    assert "Traceback" not in (details or "") and 'File "' not in (details or ""), f"{where}: {details[:300]}"
    assert len(details or "") <= MAX_DETAIL, f"{where}: a detail of {len(details)} characters"


def call(stack, service: str, name: str, request, timeout: float = 20.0):
    """Calls one RPC (any shape) and returns (code, details)."""
    process, method = method_of(service, name)
    path = f"/{service}/{name}"
    channel = stack.channel(process)
    serialize = type(request).SerializeToString if not isinstance(request, bytes) else (lambda raw: raw)
    try:
        if method.client_streaming and method.server_streaming:
            stream = channel.stream_stream(path, request_serializer=serialize)(iter([request]), timeout=3)
            try:
                next(iter(stream))
            except StopIteration:
                pass
            stream.cancel()
        elif method.client_streaming:
            channel.stream_unary(path, request_serializer=serialize)(iter([request, request]), timeout=timeout)
        elif method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=serialize)(request, timeout=timeout)
            try:
                next(iter(stream))
            except StopIteration:
                pass
            stream.cancel()
        else:
            channel.unary_unary(path, request_serializer=serialize)(request, timeout=timeout)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.CANCELLED and method.server_streaming:
            return grpc.StatusCode.OK, ""     # our own cancel after the first message
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and method.client_streaming and method.server_streaming:
            return grpc.StatusCode.OK, ""     # Subscribe: nothing to say within 3 s is fine
        return error.code(), error.details() or ""


@pytest.mark.parametrize("service,name", METHODS, ids=[f"{s.rsplit('.', 1)[1]}.{m}" for s, m in METHODS])
def test_hostile_values_get_precise_statuses(stack, service, name):
    _, method = method_of(service, name)

    @settings(max_examples=12, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(request=message_of(method.input_type))
    def run(request):
        if name == "Subscribe" and request.WhichOneof("message") == "start":
            # A valid new group would create a replication slot per example: hostile names only.
            assume(not GROUP_NAME.fullmatch(request.start.consumer_group))
        if name == "Resync":
            request.all = False       # recomputing the whole catalog is valid and slow, not hostile
        code, details = call(stack, service, name, request)
        check_status(code, details, f"{service}/{name}")

    run()


@pytest.mark.parametrize("service,name", METHODS, ids=[f"{s.rsplit('.', 1)[1]}.{m}" for s, m in METHODS])
def test_unparsable_bytes_are_invalid_argument(stack, service, name):
    for payload in (b"\x0a\x02\xc3\x28", b"\xff\xff\xff\xff\x0f", b"\x0a\xff\xff\xff\xff\x0f"):
        code, details = call(stack, service, name, payload)
        # An empty-looking request may parse (unknown fields are kept): then any precise status.
        check_status(code, details, f"{service}/{name} with raw bytes {payload!r}")


@pytest.mark.parametrize("service,name", METHODS, ids=[f"{s.rsplit('.', 1)[1]}.{m}" for s, m in METHODS])
def test_one_millisecond_deadlines(stack, service, name):
    _, method = method_of(service, name)
    request = message_factory.GetMessageClass(method.input_type)()
    code, details = call(stack, service, name, request, timeout=0.001)
    check_status(code, details, f"{service}/{name} at 1 ms",
                 allowed=PRECISE | {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})


def test_cancelled_streams_and_then_every_service_still_answers(stack):
    channel = stack.channel("features")
    watch = channel.unary_stream("/deltarec.v1.FeaturesService/WatchItems",
                                 request_serializer=features_pb2.WatchItemsRequest.SerializeToString)(
        features_pb2.WatchItemsRequest(), timeout=30)
    next(iter(watch))
    watch.cancel()
    start = collector_pb2.SubscribeRequest(start=collector_pb2.SubscribeStart(consumer_group="fuzz_cancel"))
    subscribe = stack.channel("collector").stream_stream(
        "/deltarec.v1.CollectorService/Subscribe", request_serializer=collector_pb2.SubscribeRequest.SerializeToString)(
        iter([start]), timeout=30)
    subscribe.cancel()

    # Everyone still answers, says SERVING, and logged no ERROR for anything above.
    stack.wait_serving(timeout_s=60)
    assert call(stack, "deltarec.v1.RankerService", "Recommend",
                ranker_pb2.RecommendRequest(user_id="u-after-fuzz", k=3))[0] == grpc.StatusCode.OK
    assert call(stack, "deltarec.v1.FeaturesService", "GetItemFeatures",
                features_pb2.GetItemFeaturesRequest(item_ids=stack.items[:3]))[0] == grpc.StatusCode.OK
    errors = stack.log_errors()
    assert not any(errors.values()), {name: lines[:3] for name, lines in errors.items() if lines}
