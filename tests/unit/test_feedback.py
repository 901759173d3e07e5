"""The feedback loop's pure logic: recommendation ids, attribution and windows, the mSPRT's
false-positive rate under continuous monitoring, and the canary policy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from services.common.config import load
from services.feedback import recommendation_id as rid
from services.feedback.impressions import ImpressionBuffer
from services.feedback.online_metrics import Impression, OnlineMetrics, position_gain
from services.feedback.policy import ABORT, CONTINUE, PROMOTE, CanaryPolicyConfig, VariantEvidence, decide
from services.feedback.sequential import Arm, msprt


def test_recommendation_id_round_trip_and_validation():
    made = rid.new_id(42, "canary", "search")
    text = made.encode()
    assert len(text) == rid.LENGTH and rid.parse(text) == made
    assert len({rid.new_id(1, "current", "recommend").encode() for _ in range(10_000)}) == 10_000
    for bad in ("", "x" * 21, "!" * 22, rid.RecommendationId(1, "current", "recommend", b"\0" * 10).encode()[:-1]):
        with pytest.raises(rid.InvalidRecommendationId, match="recommendation_id"):
            rid.parse(bad)


def _impression(n: int, version: int, variant: str, at: float = 1000.0) -> Impression:
    return Impression(f"r{n}", version, variant, f"u{n}", ("a", "b", "c"), at)


def test_attribution_counts_clicks_positions_gain_and_rates_once():
    metrics = OnlineMetrics(window_s=600, bucket_s=60, attribution_s=300)
    metrics.add_impression(_impression(1, 7, "canary"))
    metrics.add_impression(_impression(1, 7, "canary"))          # redelivered: counted once
    metrics.add_impression(_impression(2, 6, "current"))
    assert metrics.add_event("r1", "click", "b", 1010)
    assert metrics.add_event("r1", "click", "b", 1011)           # same item again: no more gain
    assert metrics.add_event("r1", "add_to_cart", "b", 1020)
    assert metrics.add_event("r1", "purchase", "b", 1030)
    assert not metrics.add_event("r1", "click", "zzz", 1030)     # not shown
    assert not metrics.add_event("r2", "click", "a", 1000 + 301)  # outside the attribution window
    assert not metrics.add_event("unknown", "click", "a", 1001)
    window = metrics.window(1100)
    canary, current = window[(7, "canary")].to_dict(), window[(6, "current")].to_dict()
    assert canary["impressions"] == 1 and canary["ctr"] == 1.0 and canary["purchase_rate"] == 1.0
    assert canary["clicks_at"] == {"1": 1} and canary["ndcg"] == pytest.approx(position_gain(1))
    assert current["impressions"] == 1 and current["ctr"] == 0.0
    assert metrics.unattributed == 3


def test_window_slides_and_expires_impressions():
    metrics = OnlineMetrics(window_s=120, bucket_s=60, attribution_s=60)
    metrics.add_impression(_impression(1, 1, "current", at=0))
    metrics.add_impression(_impression(2, 1, "current", at=200))
    assert metrics.window(210)[(1, "current")].impressions == 1
    metrics.expire(210)
    assert not metrics.add_event("r1", "click", "a", 10)       # expired, whatever the event's time


def test_msprt_false_positive_rate_on_aa_traffic_stays_nominal():
    """400 seeded A/A canaries, each looked at after every 200 impressions up to 20,000 (100
    looks): the share ever declared significant stays at alpha (binomial 3-sigma bound). The
    same looks with a fixed-horizon z-test reject far more often, so the bound is not loose."""
    alpha, runs, looks, step, rate = 0.05, 400, 100, 200, 0.05
    rng = np.random.default_rng(20261201)
    a = rng.binomial(step, rate, size=(runs, looks)).cumsum(axis=1)
    b = rng.binomial(step, rate, size=(runs, looks)).cumsum(axis=1)
    n = step * np.arange(1, looks + 1)
    rejected = naive = 0
    for run in range(runs):
        if any(msprt(Arm(int(t), int(x)), Arm(int(t), int(y)), alpha=alpha, tau=0.02).significant
               for t, x, y in zip(n, a[run], b[run])):
            rejected += 1
        pa, pb = a[run] / n, b[run] / n
        pooled = (a[run] + b[run]) / (2 * n)
        z = (pb - pa) / np.sqrt(np.maximum(pooled * (1 - pooled) * 2 / n, 1e-12))
        naive += bool(np.any(np.abs(z) > 1.96))
    fpr = rejected / runs
    bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)
    assert fpr <= bound, f"A/A false-positive rate {fpr:.3f} above {bound:.3f}"
    assert naive / runs > 2 * alpha       # peeking at a z-test is not valid: the test above matters


def test_msprt_detects_a_real_difference():
    result = msprt(Arm(20_000, 1000), Arm(5000, 400), alpha=0.05, tau=0.02)   # 5% vs 8%
    assert result.significant and result.effect == pytest.approx(0.03)
    assert not msprt(Arm(20_000, 1000), Arm(5000, 252), alpha=0.05, tau=0.02).significant


def _evidence(trials, successes, requests=0, errors=0):
    return VariantEvidence(Arm(trials, successes), requests, errors)


def test_policy_promotes_better_aborts_worse_and_otherwise_collects():
    policy = load(CanaryPolicyConfig, {"CANARY_MIN_IMPRESSIONS": "1000"})
    better = decide(policy, _evidence(20_000, 1000), _evidence(5000, 400))
    assert better.action == PROMOTE and better.evidence["test"]["significant"]
    assert decide(policy, _evidence(20_000, 1000), _evidence(5000, 100)).action == ABORT
    assert decide(policy, _evidence(20_000, 1000), _evidence(5000, 255)).action == CONTINUE
    assert decide(policy, _evidence(20_000, 1000), _evidence(900, 200)).action == CONTINUE   # too few
    errors = decide(policy, _evidence(20_000, 1000, 1000, 1), _evidence(5000, 400, 1000, 50))
    assert errors.action == ABORT and "error rate" in errors.reason


def test_policy_settings_are_validated():
    from services.common.config import ConfigError
    with pytest.raises(ConfigError, match="CANARY_ALPHA"):
        load(CanaryPolicyConfig, {"CANARY_ALPHA": "2"})
    with pytest.raises(ConfigError, match="CANARY_METRIC"):
        load(CanaryPolicyConfig, {"CANARY_METRIC": "revenue"})


def test_impression_buffer_is_bounded_retries_and_counts_losses():
    written, fail = [], [True]

    def write(batch):
        if fail[0]:
            raise ConnectionError("postgres down")
        written.extend(batch)

    buffer = ImpressionBuffer(write, capacity=3, batch_size=2)
    assert all(buffer.offer(_impression(n, 1, "current")) for n in range(3))
    assert not buffer.offer(_impression(9, 1, "current")) and buffer.dropped == 1
    with pytest.raises(ConnectionError):
        buffer.flush_once()                                   # kept for the retry
    fail[0] = False
    assert buffer.flush_once() == 2 and buffer.flush_once() == 1
    assert [i.recommendation_id for i in written] == ["r0", "r1", "r2"]


def test_collector_validates_and_keeps_an_events_recommendation_id():
    from datetime import datetime, timezone

    from deltarec.v1 import common_pb2

    from services.collector.validation import Rejected, validate_event
    now = datetime.now(timezone.utc)
    good = rid.new_id(3, "canary", "recommend").encode()
    event = common_pb2.Event(event_id="e1", type=common_pb2.EVENT_TYPE_CLICK, user_id="u", item_id="i",
                             recommendation_id=good)
    assert validate_event(event, now, 60).attributes[rid.EVENT_ATTRIBUTE] == good
    event.recommendation_id = "not-an-id"
    with pytest.raises(Rejected, match="^recommendation_id:"):
        validate_event(event, now, 60)
    event.recommendation_id = ""
    event.attributes[rid.EVENT_ATTRIBUTE] = good
    with pytest.raises(Rejected, match="reserved"):
        validate_event(event, now, 60)


def test_attribution_stamps_answers_and_queues_their_impressions():
    from services.feedback.attribution import Attribution
    from services.ranker.answer import Answer, Scored
    buffer = ImpressionBuffer(lambda batch: None)
    answer = Answer([Scored("x", 0.9), Scored("y", 0.5)], model_version=9, data_lsn=1, variant="canary")
    text = Attribution(buffer).stamp(answer, "recommend", "u7")
    parsed = rid.parse(text)
    assert (parsed.model_version, parsed.variant, parsed.kind) == (9, "canary", "recommend")
    queued = buffer._queue[0]
    assert (queued.recommendation_id, queued.user_id, queued.item_ids) == (text, "u7", ("x", "y"))
    metrics = OnlineMetrics()
    metrics.add_impression(queued)
    assert metrics.add_event(text, "click", "y", queued.shown_at + 1)
    assert metrics.window(queued.shown_at)[(9, "canary")].clicked == 1
