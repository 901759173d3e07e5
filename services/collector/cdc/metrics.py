"""Prometheus metrics of the delta stream, per consumer group."""
from __future__ import annotations

from prometheus_client import Counter, Gauge

DELTAS = Counter("deltarec_cdc_deltas_total", "Deltas sent to consumers (rate() = deltas/s)", ["group"])
BATCHES = Counter("deltarec_cdc_batches_total", "Delta batches sent to consumers", ["group"])
SNAPSHOT_ROWS = Counter("deltarec_cdc_snapshot_rows_total", "Initial-snapshot rows sent", ["group"])
SNAPSHOTS = Counter("deltarec_cdc_snapshots_total", "Initial snapshots started (restarts included)", ["group"])
REDELIVERED = Counter("deltarec_cdc_redelivered_deltas_total",
                      "Deltas sent again because they were not acked before a reconnect "
                      "(counted within one collector process)", ["group"])
ACKS = Counter("deltarec_cdc_acks_total", "Acks received from consumers", ["group"])
LAG_BYTES = Gauge("deltarec_cdc_lag_bytes",
                  "WAL bytes between the server's current position and what the group acked "
                  "(or is known to be caught up to)", ["group"])
LAG_SECONDS = Gauge("deltarec_cdc_lag_seconds",
                    "Age of the oldest transaction read from the slot and not yet acked (0 when "
                    "caught up)", ["group"])
BUFFERED = Gauge("deltarec_cdc_buffered_deltas", "Decoded deltas waiting in the stream's buffer", ["group"])
UNACKED = Gauge("deltarec_cdc_unacked_batches", "Batches sent and not yet acked", ["group"])
STREAMS = Gauge("deltarec_cdc_active_streams", "Streams of the group this collector is serving", ["group"])
STANDBY = Gauge("deltarec_cdc_standby_streams", "Streams waiting for the group's slot", ["group"])
ACKED_LSN = Gauge("deltarec_cdc_acked_lsn", "Highest LSN the group acked", ["group"])
