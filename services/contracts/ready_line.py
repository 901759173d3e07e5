"""The line on stdout by which a started service says it is ready, and where: launchers (make run,
tests, benchmarks: scripts/launch.py; the ranker's supervisor) parse it to find its ports.

    DELTAREC_READY <name> grpc_port=<N> metrics_port=<M|None>[ key=value ...]
"""
from __future__ import annotations

import re

READY_LINE = re.compile(r"DELTAREC_READY (\S+) grpc_port=(\d+) metrics_port=(\S+)")


def ready_line(name: str, grpc_port: int, metrics_port: int | None, **extra) -> str:
    return " ".join([f"DELTAREC_READY {name} grpc_port={grpc_port} metrics_port={metrics_port}",
                     *(f"{key}={value}" for key, value in extra.items())])


def ready_fields(line: str) -> dict[str, str]:
    """The `key=value` words after the ports of a ready line (e.g. the ranker supervisor's
    `workers=N`); empty when there are none."""
    match = READY_LINE.search(line)
    if not match:
        return {}
    return dict(word.split("=", 1) for word in line[match.end():].split() if "=" in word)
