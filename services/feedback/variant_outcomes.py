"""Requests and server-side failures per (model version, variant), counted by each ranker replica
and read by the canary decider: the input of the policy's error-rate abort
(CANARY_MAX_ERROR_RATE_INCREASE).

The contract, defined here once: a replica publishes `snapshot()` under VARIANT_OUTCOMES_FIELD
in its etcd registration (`rankers/<replica>`, refreshed every few seconds); the decider sums
`outcomes_from_registrations` over the live registrations. Counts are cumulative since the
replica started, so a replica that dies takes its counts with it (its lease ends its
registration): the rates stay rates over the traffic of the replicas that are up.

What counts as a failure: an answer the service could not give for reasons of its own (INTERNAL,
UNAVAILABLE, a deadline spent inside the replica) — never the caller's mistakes (INVALID_ARGUMENT,
NOT_FOUND, FAILED_PRECONDITION for a min_data_lsn the replica has not reached) nor admission
control's RESOURCE_EXHAUSTED, which says the replica is full, not which model is worse.
"""
from __future__ import annotations

import threading
from typing import Iterable

import grpc

from services.common.errors import DeltaRecError

VARIANT_OUTCOMES_FIELD = "variant_outcomes"

_NOT_THE_MODELS_FAULT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                   grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                                   grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED,
                                   grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.CANCELLED})


def is_server_failure(error: BaseException) -> bool:
    """True for an error the variant that served the request is answerable for."""
    if isinstance(error, DeltaRecError):
        return error.code not in _NOT_THE_MODELS_FAULT
    return True                        # anything unexpected becomes INTERNAL at the edge


class VariantOutcomes:
    """Thread-safe counters, one pair per (model version, variant)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, str], list[int]] = {}

    def record(self, model_version: int, variant: str, failed: bool) -> None:
        key = (int(model_version), variant)
        with self._lock:
            counts = self._counts.get(key)
            if counts is None:
                counts = self._counts[key] = [0, 0]
            counts[0] += 1
            counts[1] += int(failed)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [{"model_version": version, "variant": variant, "requests": counts[0], "errors": counts[1]}
                    for (version, variant), counts in sorted(self._counts.items())]


def outcomes_from_registrations(values: Iterable[dict]) -> dict[tuple[int, str], tuple[int, int]]:
    """(model version, variant) -> (requests, errors) summed over registrations. A malformed
    entry (an older replica, a hand-edited key) is skipped, not trusted."""
    total: dict[tuple[int, str], list[int]] = {}
    for value in values:
        entries = value.get(VARIANT_OUTCOMES_FIELD) if isinstance(value, dict) else None
        if not isinstance(entries, list):
            continue
        for entry in entries:
            try:
                key = (int(entry["model_version"]), str(entry["variant"]))
                requests, errors = int(entry["requests"]), int(entry["errors"])
            except (KeyError, TypeError, ValueError):
                continue
            if requests < 0 or not 0 <= errors <= requests:
                continue
            counts = total.setdefault(key, [0, 0])
            counts[0] += requests
            counts[1] += errors
    return {key: (counts[0], counts[1]) for key, counts in total.items()}
