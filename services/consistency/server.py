"""The gRPC edge of the consistency service: messages in and out, errors to statuses."""
from __future__ import annotations

import json

from google.protobuf.timestamp_pb2 import Timestamp

from deltarec.v1 import consistency_pb2, consistency_pb2_grpc
from services.common.errors import FailedPrecondition, InvalidArgument, grpc_errors
from services.consistency.core import ConsistencyCore
from services.consistency.findings import MAX_KEYS, Report
from services.consistency.online import OnlineMetricsCore, OnlineReport
from services.feedback.online_metrics import UNATTRIBUTED_REASONS


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def report_message(report: Report) -> consistency_pb2.CheckResponse:
    return consistency_pb2.CheckResponse(
        consistent=report.consistent,
        findings=[consistency_pb2.Finding(
            check=f.check, severity=int(f.severity), subject=f.subject, detail=f.detail,
            repairable=f.repairable, keys=f.keys[:MAX_KEYS], key_count=f.key_count, lsn_from=f.lsn_from,
            lsn_to=f.lsn_to,
            model_version=f.model_version) for f in report.findings],
        current_model_version=report.current_version, canary_model_version=report.canary_version,
        replicas=[consistency_pb2.ReplicaState(
            replica_id=r.replica_id, model_version=r.model_version, data_lsn=r.data_lsn,
            index_size=r.index_size, index_checksum=r.index_checksum, address=r.address,
            answering=r.answering,
            canary_version=r.canary_version, index_digest=r.index_digest) for r in report.replicas],
        digests=[consistency_pb2.DigestSummary(
            kind=d.kind, side=d.side, rows=d.rows, buckets=d.buckets, root=d.root,
            differing_buckets=d.differing_buckets, rows_read=d.rows_read, seconds=d.seconds)
            for d in report.digests],
        source_checksum=report.source_root, feature_store_checksum=report.feature_store_root,
        checked_at=_timestamp(report.checked_at), watermark=report.watermark, seconds=report.seconds)


def online_message(report: OnlineReport) -> consistency_pb2.OnlineMetricsResponse:
    response = consistency_pb2.OnlineMetricsResponse(
        window_s=report.window_s, attribution_window_s=report.attribution_s, as_of=_timestamp(report.at),
        applied_lsn=report.applied_lsn, pending_events=report.held, attributed_events=report.counts.get("attributed", 0),
        consumer_running=report.running, consumer_detail=report.detail,
        unattributed=consistency_pb2.UnattributedEvents(
            **{reason: report.counts.get(reason, 0) for reason in UNATTRIBUTED_REASONS}))
    for version, variant, counters in report.variants:
        figures = counters.to_dict()
        positions = max(counters.clicks_at, default=-1) + 1
        response.variants.add(
            model_version=version, variant=variant, impressions=counters.impressions,
            clicked_impressions=counters.clicked, click_through_rate=figures["ctr"], clicks=counters.clicks,
            clicks_at_position=[counters.clicks_at.get(p, 0) for p in range(positions)],
            add_to_cart_impressions=counters.carts, add_to_cart_rate=figures["add_to_cart_rate"],
            purchase_impressions=counters.purchases, purchase_rate=figures["purchase_rate"],
            position_weighted_gain=figures["ndcg"], total_position_weighted_gain=counters.gain)
    canary = response.canary
    canary.decider_running = report.decider_running
    canary.decide_interval_s = report.decide_interval_s
    canary.holds_decider_lease = report.holds_decider_lease
    evaluation = report.evaluation
    if evaluation is not None:
        canary.state = evaluation.state
        canary.canary_model_version = evaluation.canary_version
        canary.current_model_version = evaluation.current_version
        canary.reason = evaluation.reason
        if evaluation.decision is not None:
            canary.metric = evaluation.decision.evidence.get("metric", "")
            canary.alpha = float(evaluation.decision.evidence.get("alpha", 0.0))
        canary.effect = evaluation.effect
        canary.log_likelihood_ratio = evaluation.log_lambda
        canary.always_valid_p_value = evaluation.p_value
        canary.tested = evaluation.tested
        canary.decision_written = evaluation.written
        canary.evidence_json = evaluation.evidence_json()
        canary.evaluated_at.CopyFrom(_timestamp(evaluation.at))
    last = report.last_decision
    if last is not None:
        evidence = last["canary_evidence"] or {}
        record = canary.last_decision
        record.canary_model_version = int(last["version"])
        record.action = last["canary_decision"]
        record.reason = str(evidence.get("reason", "")) if isinstance(evidence, dict) else ""
        if last["canary_decided_at"] is not None:
            record.decided_at.CopyFrom(_timestamp(last["canary_decided_at"].timestamp()))
        record.evidence_json = json.dumps(evidence, default=str, sort_keys=True)
    return response


class ConsistencyServicer(consistency_pb2_grpc.ConsistencyServiceServicer):
    def __init__(self, core: ConsistencyCore, online: OnlineMetricsCore | None = None) -> None:
        self.core, self.online = core, online

    @grpc_errors
    def Check(self, request, context):
        return report_message(self.core.check(list(request.checks)))

    @grpc_errors
    def Reconcile(self, request, context):
        for n, name in enumerate(request.drop_slots):
            if not name:
                raise InvalidArgument(f"drop_slots[{n}]: empty slot name")
        actions, before, after = self.core.reconcile(dry_run=request.dry_run,
                                                     drop_slots=list(request.drop_slots))
        response = consistency_pb2.ReconcileResponse(
            actions=[consistency_pb2.RepairAction(
                check=a.check, subject=a.subject,
                action=f"{a.action}: {a.outcome}" if a.outcome else a.action,
                done=a.done) for a in actions],
            before=report_message(before))
        if after is not None:
            response.after.CopyFrom(report_message(after))
        return response

    @grpc_errors
    def Rollback(self, request, context):
        if request.version == 0:
            raise InvalidArgument("version: required (a version published before)")
        result = self.core.rollback(request.version)
        return consistency_pb2.RollbackResponse(previous_version=result.previous_version,
                                                current_version=result.current_version, sha256=result.sha256)

    @grpc_errors
    def History(self, request, context):
        entries = self.core.entries(request.limit, request.kind)
        return consistency_pb2.HistoryResponse(entries=[consistency_pb2.HistoryEntry(
            at=_timestamp(e.at.timestamp()), kind=e.kind, detail=e.summary, consistent=bool(e.consistent),
            detail_json=json.dumps(e.detail, default=str), instance=e.instance) for e in entries])

    @grpc_errors
    def OnlineMetrics(self, request, context):
        if self.online is None:
            raise FailedPrecondition("online metrics are not served by this instance")
        return online_message(self.online.report(request.window_s, request.model_version, request.variant))
