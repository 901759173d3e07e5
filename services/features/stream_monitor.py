"""What the delta stream last told us, for Status: lag in bytes and seconds.

Heartbeats carry the server's WAL position and, when we are fully caught up, `caught_up_lsn`
(every change of our tables committed up to there was sent and acked). Between a caught-up
heartbeat and the next batch there is nothing for us to do, whatever the distance to the server's
WAL position (other tables, other databases), so the lag is 0. Otherwise the lag is the distance
from what we applied to the server's position, and, in seconds, the age of the oldest commit we
hold but have not applied yet (the batch being applied), or of the last one applied.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timezone


@dataclass(frozen=True)
class Lag:
    server_lsn: int
    lag_bytes: int
    lag_seconds: float


class StreamMonitor:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.server_lsn = 0
        self.caught_up = False
        self._in_flight_since: datetime | None = None

    def batch_received(self, commit_time: datetime | None) -> None:
        with self._lock:
            self.caught_up = False
            self._in_flight_since = commit_time

    def batch_applied(self) -> None:
        with self._lock:
            self._in_flight_since = None

    def heartbeat(self, server_lsn: int, caught_up_lsn: int) -> None:
        with self._lock:
            self.server_lsn = max(self.server_lsn, server_lsn)
            self.caught_up = caught_up_lsn > 0

    def lag(self, applied_lsn: int, current_wal_lsn: int, last_applied_commit: datetime | None,
            now: datetime | None = None) -> Lag:
        now = now or datetime.now(timezone.utc)
        with self._lock:
            server_lsn = max(self.server_lsn, current_wal_lsn, applied_lsn)
            if self.caught_up:
                return Lag(server_lsn, 0, 0.0)
            reference = self._in_flight_since or last_applied_commit
        lag_bytes = server_lsn - applied_lsn
        lag_seconds = 0.0
        if lag_bytes and reference is not None:
            lag_seconds = max(0.0, (now - reference).total_seconds())
        return Lag(server_lsn, lag_bytes, lag_seconds)
