"""Prometheus metrics of the consistency service."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

FINDINGS = Gauge("deltarec_consistency_findings", "Findings of the last check", ["check", "severity"])
CHECKS = Counter("deltarec_consistency_checks_total", "Checks run", ["outcome"])
CHECK_SECONDS = Histogram("deltarec_consistency_check_seconds", "Duration of a full check",
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
DIGEST_SECONDS = Histogram("deltarec_consistency_digest_seconds", "Time to digest one side of a comparison",
                           ["kind"], buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
LAST_CONSISTENT = Gauge("deltarec_consistency_last_consistent_timestamp_seconds",
                        "Wall-clock time of the last check that came back consistent")
LAST_CHECK = Gauge("deltarec_consistency_last_check_timestamp_seconds", "Wall-clock time of the last check")
REPAIRS = Counter("deltarec_consistency_repairs_total", "Repair actions", ["action", "outcome"])
ROLLBACKS = Counter("deltarec_consistency_rollbacks_total", "Rollbacks", ["outcome"])
REPAIRER = Gauge("deltarec_consistency_repairer", "1 while this instance holds the repair lease")
DRIFTED_KEYS = Gauge("deltarec_consistency_drifted_keys", "Items or users named by the last check's findings",
                     ["check"])

# ---- the feedback loop: online metrics per (model version, variant) over FEEDBACK_WINDOW_S
_VERSION_VARIANT = ["model_version", "variant"]
ONLINE_IMPRESSIONS = Gauge("deltarec_online_impressions", "Answers shown in the window", _VERSION_VARIANT)
ONLINE_CLICKS = Gauge("deltarec_online_clicks", "Attributed clicks on distinct shown items in the window",
                      _VERSION_VARIANT)
ONLINE_CTR = Gauge("deltarec_online_click_through_rate", "Share of the window's impressions with an attributed click",
                   _VERSION_VARIANT)
ONLINE_ADD_TO_CART_RATE = Gauge("deltarec_online_add_to_cart_rate",
                                "Share of the window's impressions followed by an attributed add-to-cart",
                                _VERSION_VARIANT)
ONLINE_PURCHASE_RATE = Gauge("deltarec_online_purchase_rate",
                             "Share of the window's impressions followed by an attributed purchase", _VERSION_VARIANT)
ONLINE_GAIN = Gauge("deltarec_online_position_weighted_gain",
                    "Mean NDCG-style gain per impression (1/log2(position+2) per clicked item)", _VERSION_VARIANT)
ONLINE_GAUGES = (ONLINE_IMPRESSIONS, ONLINE_CLICKS, ONLINE_CTR, ONLINE_ADD_TO_CART_RATE, ONLINE_PURCHASE_RATE,
                 ONLINE_GAIN)
FEEDBACK_EVENTS = Gauge("deltarec_feedback_events",
                        "Events with a recommendation_id by outcome (attributed, no_impression, ...), since the "
                        "last rebuild of the window", ["outcome"])
FEEDBACK_HELD = Gauge("deltarec_feedback_held_events", "Events waiting for their impression")
FEEDBACK_APPLIED_LSN = Gauge("deltarec_feedback_applied_lsn", "Commit LSN of the feedback stream's last batch")
FEEDBACK_REBUILDS = Counter("deltarec_feedback_rebuilds_total", "Rebuilds of the window from the tables")
CANARY_DECIDER_RUNNING = Gauge("deltarec_canary_decider_running", "1 while the canary decider loop runs here")
CANARY_P_VALUE = Gauge("deltarec_canary_always_valid_p_value",
                       "The canary's always-valid p-value at the last evaluation", ["canary_version"])
CANARY_DECISIONS = Counter("deltarec_canary_decisions_total", "Canary decisions reached, and whether written",
                           ["action", "written"])
