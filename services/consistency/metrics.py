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
