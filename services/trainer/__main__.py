"""python -m services.trainer — the trainer server.

Every process serves the read RPCs (ListVersions, GetVersion, Status); the one holding the etcd
lease `trainer/leader` also records the delta stream, runs the strategy loop and answers Train
and Update (standbys answer FAILED_PRECONDITION naming the leader).
"""
from __future__ import annotations

import logging
import sys

from deltarec.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.artifacts import ArtifactStore
from services.common.boot import Boot
from services.common.readiness import Readiness, store_reachable
from services.trainer.config import TrainerConfig, check_settings
from services.trainer.leader import LeaderElector
from services.trainer.publisher import Publisher
from services.trainer.runs import RunHooks, TrainerCore, set_torch_threads
from services.trainer.scheduler import TrainingLoop
from services.trainer.server import TrainerServicer
from services.trainer.stream_recorder import StreamRecorder
from services.trainer.versions import describe_version

log = logging.getLogger("deltarec.trainer")


def main(hooks: RunHooks | None = None) -> int:
    """`hooks`: the failure drills' (tests/trainer_drills.py); the service itself runs without."""
    boot = Boot.load("trainer", TrainerConfig, check=check_settings)
    config = boot.config
    set_torch_threads(config.torch_threads)
    engine = boot.database(pool_size=4)
    etcd = boot.etcd()
    try:
        store = ArtifactStore(config.artifact_uri, engine)
    except ValueError as error:
        boot.config_error(f"TRAINER_ARTIFACT_URI: {error}")
    trainer_id = boot.instance_id(config.trainer_id)
    core = TrainerCore(config, engine, Publisher(etcd, store), trainer_id, hooks=hooks)
    core.on_version = lambda row, published: print(describe_version(row, published), flush=True)
    recorder = StreamRecorder(config.collector_address, core)
    loop = TrainingLoop(core, enabled=config.loop_enabled, interval_s=config.loop_interval_s,
                        min_interactions=config.min_interactions, full_retrain_growth=config.full_retrain_growth,
                        min_text_coverage=config.min_text_coverage, recorder=recorder,
                        first_epochs=config.first_epochs, shadow_full_every=config.shadow_full_every)
    elector = LeaderElector(etcd, trainer_id, config.leader_ttl_s, on_elected=loop.elected, on_lost=recorder.stop)
    core.is_leader, core.leader_id = elector.is_leader, elector.leader_id

    service = boot.grpc_service(trainer_pb2, "TrainerService")
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(core), service.server)
    service.on_shutdown(loop.stop)
    service.on_shutdown(elector.stop)
    log.info("trainer starting", extra={"trainer_id": trainer_id, "artifact_uri": config.artifact_uri,
                                        "loop": config.loop_enabled, "strategy": core.default_strategy().to_dict()})
    loop.start()
    elector.start()
    # Health follows progress: NOT_SERVING while the store, the leader's delta stream, the loop
    # or the artifact store's free space stops it from doing its job (SERVING again by itself).
    readiness = (Readiness(service).add("postgres", store_reachable(engine))
                 .add("delta stream", lambda: recorder.progress_problem(config.stall_after_s))
                 .add("training loop", loop.progress_problem)
                 .add("artifact store", store.space_problem))
    # A training still running in a worker thread must not hold the process past the shutdown
    # grace: every run is crash-safe (the next leader finishes or redoes it), so exit at once.
    return boot.run(ready_check=readiness.start, exit_at_once=True)


if __name__ == "__main__":
    sys.exit(main())
