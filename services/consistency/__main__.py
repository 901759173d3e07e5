"""python -m services.consistency — the consistency server.

Any instance checks (on request and every CONSISTENCY_CHECK_INTERVAL_S); only the holder of
the etcd lease `consistency/repairer` repairs and rolls back. With COLLECTOR_ADDRESS (and
FEEDBACK_ENABLED) it also joins impressions and events from the delta stream into the online
metrics (OnlineMetrics, Prometheus) and runs the canary decider loop (CANARY_DECIDE_INTERVAL_S).
"""
from __future__ import annotations

import logging
import sys

from deltarec.v1 import consistency_pb2, consistency_pb2_grpc
from services.common.boot import Boot
from services.common.config import ConfigError, load
from services.common.readiness import Readiness
from services.consistency.canary_loop import CanaryLoop
from services.consistency.config import ConsistencyConfig, check_consistency_config
from services.consistency.core import ConsistencyCore
from services.consistency.feedback_stream import FeedbackSettings, FeedbackStream
from services.consistency.online import OnlineMetricsCore
from services.consistency.server import ConsistencyServicer
from services.feedback.policy import CanaryPolicyConfig

log = logging.getLogger("deltarec.consistency")


def main() -> int:
    boot = Boot.load("consistency", ConsistencyConfig, check=check_consistency_config)
    config = boot.config
    try:
        policy = load(CanaryPolicyConfig)
    except ConfigError as error:
        boot.config_error(str(error))
    engine = boot.database(pool_size=4)
    core = ConsistencyCore(config, engine, boot.etcd(), boot.instance_id(config.instance_id))
    service = boot.grpc_service(consistency_pb2, "ConsistencyService")

    feedback = loop = None
    off_reason = ("FEEDBACK_ENABLED=false" if not config.feedback_enabled
                  else "COLLECTOR_ADDRESS is unset (the feedback join reads the delta stream)")
    if config.feedback_enabled and config.collector_address:
        feedback = FeedbackStream(engine, config.collector_address, config.feedback_consumer,
                                  FeedbackSettings.from_config(config))
        loop = CanaryLoop(core.etcd, engine, feedback, policy, core.instance_id,
                          interval_s=config.canary_decide_interval_s, ttl_s=config.canary_decider_ttl_s)
    online = OnlineMetricsCore(feedback, loop, core.versions, off_reason=off_reason)
    consistency_pb2_grpc.add_ConsistencyServiceServicer_to_server(ConsistencyServicer(core, online), service.server)
    # Shutdown: the decider loop first (it resigns its lease), then the stream, then the core.
    if loop is not None:
        service.on_shutdown(loop.stop)
    if feedback is not None:
        service.on_shutdown(feedback.stop)
    service.on_shutdown(core.stop)
    log.info("consistency starting", extra={"instance": core.instance_id,
                                            "check_interval_s": config.check_interval_s,
                                            "feedback": feedback is not None or off_reason,
                                            "canary_decide_interval_s": config.canary_decide_interval_s})
    core.start()
    readiness = Readiness(service)
    if feedback is not None:
        feedback.start()
        loop.start()
        # Health follows progress: NOT_SERVING while the feedback stream cannot be applied for
        # FEEDBACK_STALL_S (a standby instance is fine: one instance holds the stream).
        readiness.add("feedback stream", feedback.progress_problem)

    def ready() -> None:
        core.wait_ready()
        readiness.start()
    return boot.run(ready_check=ready)


if __name__ == "__main__":
    sys.exit(main())
