"""Client channels of service-to-service calls, made one way.

A target is one of:
  `host:port`               one address (the name resolved once per connection);
  `dns:///name:port`        every address the name resolves to — a Kubernetes headless Service
                            answers with one A record per ready pod;
  `ipv4:a:p,b:p,...`        a fixed list of addresses.

Every channel asks for the `round_robin` load-balancing policy: one subchannel per address and
calls spread over the ready ones; an address that fails is skipped and the name re-resolved.
gRPC's default (`pick_first`) sends every call of a long-lived channel to the one address it
first connected to, so replicas added later would take no load from it. (Servers end their
connections after GRPC_MAX_CONNECTION_AGE_S so clients also re-resolve and find new pods.)
"""
from __future__ import annotations

import json
from typing import Sequence

import grpc

ROUND_ROBIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
_LIST_SCHEMES = ("ipv4:", "ipv6:")


def client_channel(target: str, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A plaintext channel to `target` balancing calls round-robin over its addresses."""
    return grpc.insecure_channel(target, options=[("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG),
                                                  *options])


def split_targets(value: str) -> list[str]:
    """Comma-separated targets (a consumer tries them in turn); an `ipv4:`/`ipv6:` address list
    is one target whose commas separate its addresses."""
    value = value.strip()
    if value.startswith(_LIST_SCHEMES):
        return [value]
    return [target.strip() for target in value.split(",") if target.strip()]
