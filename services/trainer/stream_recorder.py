"""Recording the delta stream while this trainer leads.

Consumer group `trainer` on the collector's delta stream (`events` table only). Each batch goes
to the interaction log in one transaction with the LSN high-water mark
(`InteractionLog.apply_batch`); the DeltaConsumer acks a batch only after that call returned, so
only durably recorded data is ever acked.
"""
from __future__ import annotations

import logging
import threading

from services.common.delta_consumer import DeltaConsumer, row_of
from services.trainer.runs import TrainerCore

log = logging.getLogger(__name__)


class StreamRecorder:
    """The delta-stream consumer of group `trainer`, started while this trainer leads."""

    def __init__(self, collector_address: str, core: TrainerCore, group: str = "trainer") -> None:
        self.collector_address, self.core, self.group = collector_address, core, group
        self.consumer = None
        self._lock = threading.Lock()

    def start(self) -> bool:
        with self._lock:
            if self.consumer is not None or not self.collector_address:
                return self.consumer is not None
            def apply_batch(batch) -> None:
                self.core.log.apply_batch(batch, row_of)

            self.consumer = DeltaConsumer(self.collector_address, self.group, apply_batch, tables=("events",))
            self.consumer.start()
            log.info("recording the delta stream", extra={"collector": self.collector_address, "group": self.group})
            return True

    @property
    def active(self) -> bool:
        return self.consumer is not None

    def caught_up(self) -> bool:
        """True once the collector said this stream is fully caught up (every change committed
        so far was delivered and acked)."""
        consumer = self.consumer
        return consumer is not None and bool(consumer.caught_up_lsn)

    def progress_problem(self, stall_after_s: float = 15.0) -> str | None:
        """Why recording cannot make progress (a readiness check); None also on a standby,
        which records nothing by design."""
        consumer = self.consumer
        return None if consumer is None else consumer.progress_problem(stall_after_s)

    def stop(self) -> None:
        with self._lock:
            consumer, self.consumer = self.consumer, None
        if consumer is not None:
            consumer.stop()
