"""gRPC edge of the trainer: translates requests to the core and back."""
from __future__ import annotations

import math
import time

from google.protobuf.timestamp_pb2 import Timestamp

from deltarec.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.errors import InvalidArgument, grpc_errors
from services.common.validation import MAX_INT64, check_choice, check_id, check_int
from services.trainer.runs import TrainerCore
from services.trainer.strategies import PRIORITIES, Strategy
from services.trainer.versions import VersionRow

STATUS = {"candidate": trainer_pb2.VERSION_STATUS_CANDIDATE, "published": trainer_pb2.VERSION_STATUS_PUBLISHED,
          "rejected": trainer_pb2.VERSION_STATUS_REJECTED, "rolled_back": trainer_pb2.VERSION_STATUS_ROLLED_BACK}
MAX_LIST = 1000


def metrics_message(values: dict | None) -> trainer_pb2.Metrics:
    values = values or {}
    return trainer_pb2.Metrics(recall_at_5=float(values.get("recall_at_5", 0.0)),
                               recall_at_10=float(values.get("recall_at_10", 0.0)),
                               ndcg_at_5=float(values.get("ndcg_at_5", 0.0)),
                               ndcg_at_10=float(values.get("ndcg_at_10", 0.0)),
                               users=int(values.get("users", 0)))


def strategy_message(strategy: Strategy | dict) -> trainer_pb2.UpdateStrategy:
    values = strategy.to_dict() if isinstance(strategy, Strategy) else strategy
    return trainer_pb2.UpdateStrategy(
        window_seconds=int(values.get("window_seconds", 0)), threshold_events=int(values.get("threshold_events", 0)),
        priority=str(values.get("priority", "")), top_share=float(values.get("top_share", 0.0)),
        replay_ratio=float(values.get("replay_ratio", 0.0)))


def version_message(row: VersionRow) -> trainer_pb2.ModelVersion:
    message = trainer_pb2.ModelVersion(
        version=row.version, parent_version=row.parent_version, strategy=row.strategy,
        parameters=strategy_message(row.parameters), lsn_from=row.lsn_from, lsn_to=row.lsn_to,
        metrics=metrics_message(row.metrics), baseline_metrics=metrics_message(row.baseline_metrics),
        train_seconds=row.train_seconds, sha256=row.sha256, artifact_uri=row.artifact_uri,
        status=STATUS.get(row.status, trainer_pb2.VERSION_STATUS_UNSPECIFIED), decision=row.decision,
        interactions=row.interactions, items=row.items, baseline_version=row.baseline_version,
        published_as=row.published_as, canary_share=row.canary_share, canary_decision=row.canary_decision,
        gate_evidence=row.gate_evidence, anchor_version=row.anchor_version, full_version=row.full_version,
        full_train_seconds=row.full_train_seconds, shadow_of=row.shadow_of)
    if row.anchor_metrics:
        message.anchor_metrics.CopyFrom(metrics_message(row.anchor_metrics))
    if row.full_metrics:
        message.full_metrics.CopyFrom(metrics_message(row.full_metrics))
    if row.created_at is not None:
        message.created_at.FromDatetime(row.created_at)
    return message


# Request ranges (documented in trainer.proto). torch seeds are 32-bit; a window longer than a
# century or a threshold beyond a bigint means nothing and would overflow date arithmetic.
MAX_SEED = 2 ** 32 - 1
MAX_WINDOW_SECONDS = 100 * 365 * 86400
MAX_PRIORITY_BYTES = 64


def caller_wait(context) -> float | None:
    """How long the caller still waits (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e6 else remaining


def check_seed(value: int) -> int:
    return check_int("seed", value, 0, MAX_SEED)


def strategy_from_request(message: trainer_pb2.UpdateStrategy) -> Strategy:
    """Zero top_share / replay_ratio mean their documented default (1.0)."""
    for name in ("top_share", "replay_ratio"):
        if math.isnan(getattr(message, name)):
            raise InvalidArgument(f"strategy.{name}: must be a number")
    check_int("strategy.window_seconds", message.window_seconds, 0, MAX_WINDOW_SECONDS)
    check_int("strategy.threshold_events", message.threshold_events, 0, MAX_INT64)
    if message.priority:
        check_id("strategy.priority", message.priority, max_bytes=MAX_PRIORITY_BYTES)
        check_choice("strategy.priority", message.priority, PRIORITIES)
    strategy = Strategy(window_seconds=message.window_seconds, threshold_events=message.threshold_events,
                        priority=message.priority, top_share=message.top_share or 1.0,
                        replay_ratio=message.replay_ratio or 1.0)
    try:
        return strategy.validate()
    except ValueError as error:
        raise InvalidArgument(f"strategy.{error}") from None


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, core: TrainerCore) -> None:
        self.core = core

    @grpc_errors
    def Train(self, request, context):
        seed = check_seed(request.seed)
        epochs = check_int("epochs", request.epochs, 0, self.core.config.max_epochs)
        # Synchronous: a caller that goes away (cancel, deadline) stops the run at the next epoch.
        outcome = self.core.train(seed=seed, epochs=epochs, publish=request.publish,
                                  cancelled=lambda: not context.is_active(), wait_s=caller_wait(context))
        return trainer_pb2.TrainResponse(version=version_message(outcome.version), published=outcome.published)

    @grpc_errors
    def Update(self, request, context):
        strategy = strategy_from_request(request.strategy) if request.HasField("strategy") else None
        seed = check_seed(request.seed)
        outcome = self.core.update(strategy, publish=request.publish, seed=seed,
                                   cancelled=lambda: not context.is_active(), wait_s=caller_wait(context))
        response = trainer_pb2.UpdateResponse(published=outcome.published, skipped=outcome.skipped,
                                              reason=outcome.reason)
        if outcome.version is not None:
            response.version.CopyFrom(version_message(outcome.version))
        return response

    @grpc_errors
    def ListVersions(self, request, context):
        limit = min(request.limit or 50, MAX_LIST)
        rows = self.core.versions.list(limit)
        return trainer_pb2.ListVersionsResponse(versions=[version_message(r) for r in rows],
                                                current_version=self.core.publisher.current().version)

    @grpc_errors
    def GetVersion(self, request, context):
        if request.version == 0:
            raise InvalidArgument("version: required (versions start at 1)")
        check_int("version", request.version, 1, MAX_INT64)
        return trainer_pb2.GetVersionResponse(version=version_message(self.core.get_version(request.version)))

    @grpc_errors
    def Status(self, request, context):
        status = self.core.status()
        response = trainer_pb2.TrainerServiceStatusResponse(
            leader=status["leader"], current_version=status["current_version"],
            recorded_lsn=status["recorded_lsn"], pending_interactions=status["pending"],
            strategy=strategy_message(self.core.default_strategy()), busy=status["busy"],
            trainer_id=self.core.trainer_id, leader_id=status["leader_id"],
            latest_version=status["latest_version"], canary_version=status["canary_version"],
            held=status["held"])
        if status["last_update"]:
            stamp = Timestamp()
            stamp.FromNanoseconds(int(status["last_update"] * 1e9))
            response.last_update.CopyFrom(stamp)
        progress = status["progress"]
        if progress is not None:
            response.progress.CopyFrom(trainer_pb2.TrainingProgress(
                version=progress.version, kind=progress.kind, phase=progress.phase, epoch=progress.epoch,
                epochs=progress.epochs, elapsed_seconds=time.monotonic() - progress.started))
        return response
