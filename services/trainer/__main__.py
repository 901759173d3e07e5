"""python -m services.trainer — the trainer server.

Every process serves the read RPCs (ListVersions, GetVersion, Status); the one holding the etcd
lease `trainer/leader` also records the delta stream, runs the strategy loop and answers Train
and Update (standbys answer FAILED_PRECONDITION naming the leader).
"""
from __future__ import annotations

import logging
import os
import socket
import sys

from deltarec.v1 import trainer_pb2, trainer_pb2_grpc

from services.common import db, logs
from services.common.artifacts import ArtifactStore
from services.common.config import ConfigError, load
from services.common.etcd import Etcd
from services.common.server import GrpcService, run_service
from services.trainer.config import TrainerConfig
from services.trainer.core import TrainerCore, set_torch_threads
from services.trainer.leader import LeaderElector
from services.trainer.loop import StreamRecorder, TrainingLoop
from services.trainer.publisher import Publisher
from services.trainer.server import TrainerServicer
from services.trainer.versions import VersionRow

log = logging.getLogger("deltarec.trainer")
SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


def describe_version(row: VersionRow, published: bool) -> str:
    metrics = row.metrics or {}
    base = row.baseline_metrics or {}
    line = (f"trainer: version {row.version} ({row.strategy}, parent {row.parent_version or '-'}, "
            f"{row.interactions} interactions, {row.train_seconds:.1f}s) "
            f"{'PUBLISHED' if published else row.status.upper()}  "
            f"recall@10={metrics.get('recall_at_10', 0):.4f} ndcg@10={metrics.get('ndcg_at_10', 0):.4f}")
    if base:
        line += f"  (current: recall@10={base.get('recall_at_10', 0):.4f} ndcg@10={base.get('ndcg_at_10', 0):.4f})"
    return line + f"  — {row.decision}"


def main() -> int:
    try:
        config = load(TrainerConfig)
    except ConfigError as error:
        print(f"trainer: configuration error: {error}", file=sys.stderr)
        return 2
    logs.setup("trainer", config.log_level)
    set_torch_threads(config.torch_threads)
    db.migrate(config.database_url)
    engine = db.make_engine(config.database_url, pool_size=4, application_name="deltarec-trainer")
    etcd = Etcd(config.etcd_endpoint, config.etcd_prefix)
    try:
        store = ArtifactStore(config.artifact_uri, engine)
    except ValueError as error:
        print(f"trainer: configuration error: TRAINER_ARTIFACT_URI: {error}", file=sys.stderr)
        return 2
    trainer_id = config.trainer_id or f"{socket.gethostname()}-{os.getpid()}"
    core = TrainerCore(config, engine, Publisher(etcd, store), trainer_id)
    core.on_version = lambda row, published: print(describe_version(row, published), flush=True)
    recorder = StreamRecorder(config.collector_address, core)
    loop = TrainingLoop(core, enabled=config.loop_enabled, interval_s=config.loop_interval_s,
                        min_interactions=config.min_interactions, full_retrain_growth=config.full_retrain_growth,
                        min_text_coverage=config.min_text_coverage, recorder=recorder)

    def on_elected() -> None:
        recorder.start()
        loop.elected()

    elector = LeaderElector(etcd, trainer_id, config.leader_ttl_s, on_elected=on_elected, on_lost=recorder.stop)
    core.is_leader, core.leader_id = elector.is_leader, elector.leader_id

    service = GrpcService.from_config("trainer", [SERVICE_NAME], config)
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(core), service.server)
    service.on_shutdown(loop.stop)
    service.on_shutdown(elector.stop)
    service.on_shutdown(etcd.close)
    service.on_shutdown(engine.dispose)
    log.info("trainer starting", extra={"trainer_id": trainer_id, "artifact_uri": config.artifact_uri,
                                        "loop": config.loop_enabled, "strategy": core.default_strategy().to_dict()})
    loop.start()
    elector.start()
    run_service(service)
    # A training still running in a worker thread must not hold the process past the shutdown
    # grace: every run is crash-safe (the next leader finishes or redoes it), so exit now.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
