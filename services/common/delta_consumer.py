"""The client of the collector's delta stream (`CollectorService.Subscribe`), for every service
that consumes changes (features, trainer, ...).

    consumer = DeltaConsumer("collector:50051", "features", apply_batch, tables=["items", "events"])
    consumer.start()            # a daemon thread: connects, reconnects, applies, acks
    ...
    consumer.stop()

How a consumer applies deltas — exactly once in effect, over an at-least-once stream
-----------------------------------------------------------------------------------
The collector sends each committed transaction at least once: whatever was sent but not acked
when a stream broke (collector crash, consumer crash, network) is sent again on the next
subscription, and the collector confirms a position to its replication slot only after the
consumer acked it. `apply_batch(batch)` must therefore be *durable and idempotent*, which one
rule gives:

    Keep an LSN high-water mark with your state, and move both in one transaction.

    def apply_batch(batch):
        with engine.begin() as tx:                        # ONE transaction
            mark = tx.execute(text("SELECT applied_lsn FROM consumer_offsets "
                                   "WHERE consumer = 'features' FOR UPDATE")).scalar() or 0
            if batch.snapshot_begin:
                ...discard state derived from earlier deltas of this group; mark = 0
            if batch.commit_lsn <= mark:
                return                                    # a redelivery: already applied
            for delta in batch.deltas:
                ...apply delta (row_of(delta.new_row), row_of(delta.key), delta.op)
            tx.execute(text("INSERT INTO consumer_offsets (consumer, applied_lsn) VALUES ('features', :lsn) "
                            "ON CONFLICT (consumer) DO UPDATE SET applied_lsn = :lsn, updated_at = now()"),
                       {"lsn": batch.commit_lsn})
        # returning = durably applied; DeltaConsumer acks batch.commit_lsn only now

- Compare `batch.commit_lsn`, never `Delta.lsn`: the deltas of a transaction (and of
  transactions that were open at the same time) can have LSNs below an earlier commit.
  Batches never split a transaction, and commit_lsn grows strictly from batch to batch, so a
  batch is either entirely applied or not at all.
- The initial snapshot of a new group arrives first (`batch.snapshot`, deltas with
  OPERATION_SNAPSHOT) and follows the same rule: its batches' commit_lsn values increase up to
  the slot's consistent point. A snapshot that was interrupted before its end was acked is
  started over (with `snapshot_begin` on its first batch): discard what the earlier one left.
- If apply_batch raises, nothing is acked: the stream is closed, and after `reconnect_backoff_s`
  the unacked batches come again.
- After a reconnect, a batch is never a mix of transactions the consumer applied and new ones:
  either the collector is told exactly where the consumer is (`resume_lsn=`, e.g.
  `lambda: select applied_lsn`) and skips what it has, or it sends the transactions it may have
  sent before one per batch. So the batch-level check above is exact. (Pass `resume_lsn` when
  catching up after a restart should be fast: batches are then packed from the start.)

Values in `Delta.new_row`/`key`/`old_key` are JSON-typed (see services/collector/cdc/values.py):
numeric as decimal strings, timestamps as RFC 3339 strings, json/jsonb as objects, bigint as
numbers up to 2**53-1 (strings beyond). `row_of(struct)` turns one into a plain dict.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Callable, Sequence

import grpc
from google.protobuf import json_format, struct_pb2

from deltarec.v1 import collector_pb2, collector_pb2_grpc

from services.common import channels
from services.common.channels import split_targets

log = logging.getLogger(__name__)

# Errors that retrying will not fix: raised from run() instead of reconnecting forever.
# (UNAUTHENTICATED / PERMISSION_DENIED are retried: tokens and certificates are re-read from
# their files, so a rotation done in the wrong order heals without a restart.)
PERMANENT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED,
             grpc.StatusCode.FAILED_PRECONDITION}
MAX_BACKOFF_S = 10.0


def row_of(struct: struct_pb2.Struct) -> dict:
    """A Struct (Delta.key / new_row / old_key) as a plain dict of JSON values. Struct numbers
    are doubles: integral values come back as int."""
    return _plain(json_format.MessageToDict(struct))


def _plain(value):
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2 ** 53:
        return int(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


class DeltaConsumer:
    """Subscribes to the delta stream of `group`, calls `apply_batch` for each batch in order,
    and acks the batch's commit_lsn once apply_batch returned. Reconnects with backoff on
    UNAVAILABLE and every other transient failure (collector restart, failover to a standby
    collector, network). See the module docstring for what apply_batch must guarantee.

    `collector_address` is a gRPC target (services/common/channels.py): `dns:///collector:8080`
    (every collector pod behind a headless Service, calls balanced round-robin) or a
    comma-separated list of targets, each reconnect trying the next one, so a consumer follows
    the group's slot when a standby collector takes it over.
    """

    def __init__(self, collector_address: str, group: str,
                 apply_batch: Callable[[collector_pb2.DeltaBatch], None], *,
                 tables: Sequence[str] = (), max_batch_size: int = 500,
                 on_heartbeat: Callable[[collector_pb2.Heartbeat], None] | None = None,
                 reconnect_backoff_s: float = 0.5,
                 idle_timeout_s: float = 60.0,
                 resume_lsn: Callable[[], int] | None = None,
                 channel_options: Sequence[tuple[str, object]] = (),
                 security=channels.FROM_ENVIRONMENT) -> None:
        self.addresses = split_targets(collector_address)
        if not self.addresses:
            raise ValueError("collector_address: empty")
        self.collector_address = collector_address
        self.group = group
        self.apply_batch = apply_batch
        self.tables = list(tables)
        self.max_batch_size = max_batch_size
        self.on_heartbeat = on_heartbeat
        self.reconnect_backoff_s = reconnect_backoff_s
        # No message at all (not even a heartbeat) for this long: the connection is presumed
        # dead and is replaced.
        self.idle_timeout_s = idle_timeout_s
        # Optional: returns the consumer's durable high-water mark, exactly (e.g. SELECT
        # applied_lsn FROM consumer_offsets ...); asked before each (re)connect and sent as
        # SubscribeStart.resume_after_lsn, so that the collector skips what the consumer has and
        # batches the rest freely. Without it (or when it returns 0) the collector sends what it
        # may have sent before one transaction per batch. (The last ack of this process is not a
        # substitute: when apply_batch skipped batches, the mark is above it.)
        self.resume_lsn = resume_lsn
        self.channel_options = list(channel_options)
        self.security = security                # TLS / token settings (channels.make_channel)
        self.connected = threading.Event()      # set while a stream is live (not standing by)
        self.standby = threading.Event()        # set while the collector waits for the group's slot
        self.last_acked_lsn = 0
        self.server_lsn = 0
        self.caught_up_lsn = 0                  # from heartbeats: the consumer is up to date as of here
        self.batches = 0
        self.deltas = 0
        self.reconnects = 0
        self.error: BaseException | None = None  # a permanent error that ended run()
        # Progress: since when the consumer has been unable to make progress (disconnected,
        # standing by, or apply_batch failing), None while it is fine. See progress_problem().
        self._trouble_since: float | None = time.monotonic()
        self._trouble = "not connected yet"
        self._apply_failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._call_lock = threading.Lock()
        self._call = None
        self._address_index = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "DeltaConsumer":
        """run() in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_quietly, name=f"delta-consumer-{self.group}", daemon=True)
        self._thread.start()
        return self

    def _run_quietly(self) -> None:
        try:
            self.run(self._stop)
        except Exception as error:  # noqa: BLE001 - kept in .error
            log.error("delta consumer stopped", extra={"group": self.group, "error": str(error)[:300]})

    # ------------------------------------------------------------------ health
    def progress_problem(self, stall_after_s: float = 15.0) -> str | None:
        """Why this consumer cannot make progress, once that has lasted `stall_after_s`; None
        while it can (a service turns its health NOT_SERVING on a reason, SERVING again on None).
        A short reconnect after a collector restart is not a problem; a store that refuses every
        batch, a collector gone for good, or a consumer thread that ended are."""
        if self.error is not None:
            return f"delta consumer stopped: {str(self.error)[:200]}"
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return "delta consumer thread ended"
        since = self._trouble_since
        if since is not None and time.monotonic() - since >= stall_after_s:
            return f"delta stream of {self.group}: {self._trouble} for {time.monotonic() - since:.0f}s"
        return None

    def _troubled(self, what: str) -> None:
        if self._trouble_since is None:
            self._trouble_since = time.monotonic()
        self._trouble = what

    def _progressing(self) -> None:
        self._trouble_since = None

    def stop(self, timeout_s: float = 10) -> None:
        self._stop.set()
        self._cancel_call()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _cancel_call(self) -> None:
        with self._call_lock:
            call = self._call
        if call is not None:
            call.cancel()

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        """Blocks until `stop` is set: connects, applies and acks, reconnects with backoff.
        Raises (and sets .error) on a permanent error such as INVALID_ARGUMENT."""
        backoff = self.reconnect_backoff_s
        watcher = threading.Thread(target=self._watch_stop, args=(stop,), daemon=True,
                                   name=f"delta-consumer-stop-{self.group}")
        watcher.start()
        while not stop.is_set():
            address = self.addresses[self._address_index % len(self.addresses)]
            progressed = False
            try:
                progressed = self._stream_once(address, stop)
            except grpc.RpcError as error:
                code = error.code() if hasattr(error, "code") else None
                if stop.is_set():
                    break
                if code in PERMANENT:
                    self.error = error
                    raise
                self._troubled(f"stream {code.name if code is not None else 'error'}")
                log.info("delta stream interrupted; reconnecting",
                         extra={"group": self.group, "address": address, "code": str(code),
                                "details": (error.details() or "")[:200] if hasattr(error, "details") else ""})
            except _ApplyFailed as failure:
                self._apply_failing = True
                self._troubled(f"apply_batch failing ({type(failure.__cause__).__name__})")
                log.warning("apply_batch failed; the batch will come again",
                            extra={"group": self.group, "error": str(failure.__cause__)[:300]})
            except _Idle:
                self._troubled("idle stream")
                log.warning("delta stream idle too long; reconnecting", extra={"group": self.group, "address": address})
            except Exception as error:  # noqa: BLE001 - e.g. the store refusing resume_lsn while Postgres is down
                # Anything else is transient too: a store error while (re)connecting must never
                # end the consumer (it did: features stopped consuming for good after an outage).
                self._troubled(f"{type(error).__name__}")
                log.warning("delta consumer error; retrying",
                            extra={"group": self.group, "error": f"{type(error).__name__}: {error}"[:300]})
            finally:
                self.connected.clear()
                self.standby.clear()
            if stop.is_set():
                break
            self.reconnects += 1
            self._address_index += 1
            if progressed:
                backoff = self.reconnect_backoff_s
            stop.wait(backoff)
            backoff = min(max(backoff * 2, self.reconnect_backoff_s), MAX_BACKOFF_S)

    def _watch_stop(self, stop: threading.Event) -> None:
        stop.wait()
        self._cancel_call()

    def _stream_once(self, address: str, stop: threading.Event) -> bool:
        """One subscription; returns whether any batch was applied."""
        requests: queue.Queue = queue.Queue()
        requests.put(collector_pb2.SubscribeRequest(start=collector_pb2.SubscribeStart(
            consumer_group=self.group, tables=self.tables, max_batch_size=self.max_batch_size,
            resume_after_lsn=self._resume_after())))

        def request_iterator():
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        progressed = False
        options = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
                   ("grpc.http2.max_pings_without_data", 0)] + self.channel_options
        # A channel per subscription: each reconnect also picks up rotated TLS files.
        channel = channels.make_channel(address, channels.COLLECTOR, security=self.security, options=options)
        last_message = [time.monotonic()]
        idle_stop = threading.Event()
        try:
            stub = collector_pb2_grpc.CollectorServiceStub(channel)
            call = stub.Subscribe(request_iterator())
            with self._call_lock:
                self._call = call
            if stop.is_set():
                call.cancel()
            threading.Thread(target=self._watch_idle, args=(call, last_message, idle_stop), daemon=True).start()
            for response in call:
                last_message[0] = time.monotonic()
                kind = response.WhichOneof("message")
                if kind == "batch":
                    batch = response.batch
                    self.standby.clear()
                    self.connected.set()
                    # Applying is not idleness: a batch whose apply outlasts idle_timeout_s (a model
                    # embedding items on loaded cores) must not be taken for a silent stream, or
                    # every such batch costs a reconnect and its ack.
                    last_message[0] = math.inf
                    try:
                        self.apply_batch(batch)
                    except Exception as error:  # noqa: BLE001 - not acked; redelivered after reconnect
                        call.cancel()
                        raise _ApplyFailed() from error
                    finally:
                        last_message[0] = time.monotonic()
                    if batch.commit_lsn:
                        requests.put(collector_pb2.SubscribeRequest(ack=collector_pb2.SubscribeAck(lsn=batch.commit_lsn)))
                        # Not max(): a new snapshot (snapshot_begin) starts positions over.
                        self.last_acked_lsn = batch.commit_lsn
                    self.batches += 1
                    self.deltas += len(batch.deltas)
                    progressed = True
                    self._apply_failing = False
                    self._progressing()
                elif kind == "heartbeat":
                    heartbeat = response.heartbeat
                    if heartbeat.standby:
                        self.standby.set()
                        self.connected.clear()
                        self._troubled("standing by (another collector holds the slot)")
                    else:
                        self.standby.clear()
                        self.connected.set()
                        if not self._apply_failing:
                            self._progressing()
                    if heartbeat.server_lsn:
                        self.server_lsn = heartbeat.server_lsn
                    if heartbeat.caught_up_lsn:
                        self.caught_up_lsn = heartbeat.caught_up_lsn
                    if self.on_heartbeat is not None:
                        self.on_heartbeat(heartbeat)
                if idle_stop.is_set():
                    raise _Idle()
            if idle_stop.is_set():
                raise _Idle()
            return progressed
        except grpc.RpcError:
            if idle_stop.is_set() and not stop.is_set():
                raise _Idle() from None
            raise
        finally:
            idle_stop.set()
            requests.put(None)
            with self._call_lock:
                self._call = None
            channel.close()

    def _resume_after(self) -> int:
        """Where the consumer is, exactly, or 0 when not known."""
        return int(self.resume_lsn() or 0) if self.resume_lsn is not None else 0

    def _watch_idle(self, call, last_message: list, idle_stop: threading.Event) -> None:
        while not idle_stop.wait(min(1.0, self.idle_timeout_s / 4)):
            if time.monotonic() - last_message[0] > self.idle_timeout_s:
                idle_stop.set()
                call.cancel()
                return


class _ApplyFailed(Exception):
    pass


class _Idle(Exception):
    pass
