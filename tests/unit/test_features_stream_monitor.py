"""Lag as Status reports it, from heartbeats and batches (pure)."""
from datetime import datetime, timedelta, timezone

from services.features.stream_monitor import StreamMonitor

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def test_caught_up_heartbeat_means_no_lag_whatever_the_wal_distance():
    monitor = StreamMonitor()
    monitor.heartbeat(server_lsn=5000, caught_up_lsn=4990)
    lag = monitor.lag(applied_lsn=1000, current_wal_lsn=6000, last_applied_commit=NOW - timedelta(hours=1),
                      now=NOW)
    assert (lag.lag_bytes, lag.lag_seconds, lag.server_lsn) == (0, 0.0, 6000)


def test_batch_in_flight_lags_by_its_commit_time():
    monitor = StreamMonitor()
    monitor.heartbeat(server_lsn=5000, caught_up_lsn=4990)
    monitor.batch_received(NOW - timedelta(seconds=3))
    lag = monitor.lag(applied_lsn=4990, current_wal_lsn=5200, last_applied_commit=NOW - timedelta(hours=1),
                      now=NOW)
    assert (lag.lag_bytes, lag.lag_seconds) == (210, 3.0)
    monitor.batch_applied()
    lag = monitor.lag(applied_lsn=5100, current_wal_lsn=5200, last_applied_commit=NOW - timedelta(seconds=1),
                      now=NOW)
    assert (lag.lag_bytes, lag.lag_seconds) == (100, 1.0)


def test_not_caught_up_heartbeat_keeps_the_lag():
    monitor = StreamMonitor()
    monitor.heartbeat(server_lsn=9000, caught_up_lsn=0)
    lag = monitor.lag(applied_lsn=1000, current_wal_lsn=0, last_applied_commit=None, now=NOW)
    assert (lag.server_lsn, lag.lag_bytes, lag.lag_seconds) == (9000, 8000, 0.0)
