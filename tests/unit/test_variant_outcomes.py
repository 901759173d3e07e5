"""Requests and failures per (model version, variant): counted by the ranker's edge, published in
its registration, summed by the canary decider, and what makes the policy abort on errors."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from services.common.config import load
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.feedback.evaluation import CanaryEvaluator
from services.feedback.online_metrics import Counters
from services.feedback.policy import ABORT, CONTINUE, CanaryPolicyConfig
from services.feedback.variant_outcomes import (VARIANT_OUTCOMES_FIELD, VariantOutcomes, is_server_failure,
                                                outcomes_from_registrations)
from services.ranker.admission import Overloaded
from services.ranker.server import variant_outcomes_counted


def test_only_the_services_own_failures_count():
    assert is_server_failure(RuntimeError("boom")) and is_server_failure(Unavailable("features away"))
    for caller_side in (InvalidArgument("k: must be > 0"), NotFound("item"), FailedPrecondition("behind"),
                        Overloaded("full")):
        assert not is_server_failure(caller_side)


def test_counts_round_trip_through_registrations_and_sum_over_replicas():
    a, b = VariantOutcomes(), VariantOutcomes()
    for _ in range(3):
        a.record(4, "current", False)
    a.record(5, "canary", True)
    b.record(5, "canary", False)
    values = [json.loads(json.dumps({VARIANT_OUTCOMES_FIELD: o.snapshot()})) for o in (a, b)]
    values.append({VARIANT_OUTCOMES_FIELD: [{"model_version": 5, "variant": "canary", "requests": 1,
                                             "errors": 7}]})        # malformed: more errors than requests
    values.append({"model_version": 4})                            # an older replica without the field
    assert outcomes_from_registrations(values) == {(4, "current"): (3, 0), (5, "canary"): (2, 1)}


class _Replica:
    def __init__(self) -> None:
        self.outcomes = VariantOutcomes()
        self.state = SimpleNamespace(route=lambda user_id: (SimpleNamespace(version=9), "canary"))


class _Edge:
    def __init__(self, behaviour) -> None:
        self.replica, self.behaviour = _Replica(), behaviour

    @variant_outcomes_counted
    def Recommend(self, request, context):
        return self.behaviour(request)


def test_the_edge_charges_answers_to_their_variant_and_failures_to_the_users_route():
    answered = _Edge(lambda r: SimpleNamespace(variant=SimpleNamespace(name="current", model_version=8)))
    answered.Recommend(SimpleNamespace(user_id="u1"), None)
    assert answered.replica.outcomes.snapshot() == [
        {"model_version": 8, "variant": "current", "requests": 1, "errors": 0}]

    def fail(request):
        raise RuntimeError("model exploded")
    failing = _Edge(fail)
    with pytest.raises(RuntimeError):
        failing.Recommend(SimpleNamespace(user_id="u2"), None)

    def refuse(request):
        raise InvalidArgument("k: must be at most 500")
    refusing = _Edge(refuse)
    with pytest.raises(InvalidArgument):
        refusing.Recommend(SimpleNamespace(user_id="u3"), None)
    assert failing.replica.outcomes.snapshot() == [
        {"model_version": 9, "variant": "canary", "requests": 1, "errors": 1}]
    assert refusing.replica.outcomes.snapshot() == []


def test_a_failing_canary_is_aborted_from_the_rankers_counts_and_a_few_failures_are_not_a_rate():
    policy = load(CanaryPolicyConfig, {"CANARY_MIN_IMPRESSIONS": "1000", "CANARY_MIN_REQUESTS": "100"})
    window = {(1, "current"): Counters(), (2, "canary"): Counters()}
    evaluator = CanaryEvaluator(policy)
    failing = evaluator.evaluate(window, 1, 2, 0.0, {(1, "current"): (5000, 5), (2, "canary"): (400, 40)})
    assert failing.state == ABORT and "error rate" in failing.reason
    assert failing.decision.evidence["canary"]["errors"] == 40
    early = evaluator.evaluate(window, 1, 2, 0.0, {(1, "current"): (5000, 5), (2, "canary"): (10, 3)})
    assert early.state != ABORT and early.decision.action == CONTINUE
    healthy = evaluator.evaluate(window, 1, 2, 0.0, {(1, "current"): (5000, 5), (2, "canary"): (400, 1)})
    assert healthy.state != ABORT
