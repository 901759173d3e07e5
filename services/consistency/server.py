"""The gRPC edge of the consistency service: messages in and out, errors to statuses."""
from __future__ import annotations

import json

from google.protobuf.timestamp_pb2 import Timestamp

from deltarec.v1 import consistency_pb2, consistency_pb2_grpc
from services.common.errors import InvalidArgument, grpc_errors
from services.consistency.core import ConsistencyCore
from services.consistency.findings import MAX_KEYS, Report


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


class ConsistencyServicer(consistency_pb2_grpc.ConsistencyServiceServicer):
    def __init__(self, core: ConsistencyCore) -> None:
        self.core = core

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
