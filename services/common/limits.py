"""Message-size limits of every DeltaRec service, chosen per service instead of gRPC's defaults.

A server refuses a request larger than its `receive_bytes` (RESOURCE_EXHAUSTED, before the
handler runs) and never sends more than `send_bytes`; a client of that service uses the mirror
image (it sends at most what the server accepts and accepts what the server may send), so both
ends of every call agree. `GRPC_MAX_RECEIVE_BYTES` / `GRPC_MAX_SEND_BYTES` override a server's
values; `GRPC_MAX_METADATA_BYTES` bounds headers and trailers on both ends (a bearer token and
the status message fit many times over; a caller cannot make a server buffer megabytes of
headers). The table is in the README ("Limits").
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

KIB = 1024
MIB = 1024 * KIB


@dataclasses.dataclass(frozen=True)
class MessageLimits:
    receive_bytes: int   # the largest request message the server accepts
    send_bytes: int      # the largest response message the server sends


# Why each figure (the per-field limits are in each service's validation module):
SERVICE_LIMITS: dict[str, MessageLimits] = {
    # Requests: a batch of COLLECTOR_MAX_BATCH (1000) events or items; a typical item is < 2 KiB,
    # a maximal one (16 KiB description, 64 attributes) ~83 KiB, so a batch of maximal items must
    # be split. Responses: a delta batch never splits a transaction, so a bulk-load transaction
    # is one message: the largest figure of the suite.
    "deltarec.v1.CollectorService": MessageLimits(receive_bytes=32 * MIB, send_bytes=64 * MIB),
    # Requests are ids and query texts. Responses carry 384-d float32 vectors (1.5 KiB each):
    # GetItemFeatures / WatchItems batches of tens of thousands of items.
    "deltarec.v1.FeaturesService": MessageLimits(receive_bytes=4 * MIB, send_bytes=64 * MIB),
    # Requests are a few ids and parameters; ListVersions answers with the lineage and metrics.
    "deltarec.v1.TrainerService": MessageLimits(receive_bytes=1 * MIB, send_bytes=8 * MIB),
    # The storefront's hot path: a user id, a session, filters; k items with reasons back.
    "deltarec.v1.RankerService": MessageLimits(receive_bytes=1 * MIB, send_bytes=4 * MIB),
    # Requests name versions and scopes; reports list what disagrees.
    "deltarec.v1.ConsistencyService": MessageLimits(receive_bytes=1 * MIB, send_bytes=16 * MIB),
}
# Health, reflection and any service not in the table.
DEFAULT_LIMITS = MessageLimits(receive_bytes=1 * MIB, send_bytes=4 * MIB)
METADATA_BYTES = 16 * KIB
LARGEST_MESSAGE_BYTES = max(max(limit.receive_bytes, limit.send_bytes) for limit in SERVICE_LIMITS.values())


def server_limits(service_names: Iterable[str], receive_override: int = 0,
                  send_override: int = 0) -> MessageLimits:
    """One server hosts one DeltaRec service (plus health and reflection): its limits, or the
    largest of several."""
    limits = [SERVICE_LIMITS.get(name, DEFAULT_LIMITS) for name in service_names] or [DEFAULT_LIMITS]
    return MessageLimits(receive_bytes=receive_override or max(limit.receive_bytes for limit in limits),
                         send_bytes=send_override or max(limit.send_bytes for limit in limits))


def server_options(limits: MessageLimits, metadata_bytes: int = METADATA_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", limits.receive_bytes),
            ("grpc.max_send_message_length", limits.send_bytes),
            ("grpc.max_metadata_size", metadata_bytes),
            ("grpc.absolute_max_metadata_size", metadata_bytes)]


def client_options(service_name: str, metadata_bytes: int = METADATA_BYTES) -> list[tuple[str, int]]:
    """For a client of `service_name`: the server's limits, mirrored."""
    limits = SERVICE_LIMITS.get(service_name, DEFAULT_LIMITS)
    return [("grpc.max_receive_message_length", limits.send_bytes),
            ("grpc.max_send_message_length", limits.receive_bytes),
            ("grpc.max_metadata_size", metadata_bytes),
            ("grpc.absolute_max_metadata_size", metadata_bytes)]
