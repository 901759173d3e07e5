"""The user-change feed: `features.WatchUsers` applied to the replica's user cache.

The first connection asks for changes from now (after_lsn 0); the cache starts empty at the
first message's watermark. After a broken stream the feed reconnects with after_lsn = the
position it applied (the cache's `stream_lsn`), so no change is missed and none applied twice
(applying one twice would be harmless anyway: it only drops an entry). While it is down the
cache is not live and requests read users from features (`user_cache.py`). A features service
that rebuilt its store from a new snapshot answers FAILED_PRECONDITION: the cache forgets
everything and the feed starts again from now. A features service without WatchUsers
(UNIMPLEMENTED) is asked again every `unimplemented_retry_s`.

Every message moves the cache's position (`stream_lsn`): the stream follows every commit of the
feature store, so a cached user is known current as of the latest commit features applied, and
an answer says so in its data_lsn (with the item feed's watermark, which follows every commit
too: features' WatchItems sends a bare watermark per commit).
"""
from __future__ import annotations

import logging
import threading

import grpc

from deltarec.v1 import features_pb2

from services.ranker import metrics
from services.ranker.features_client import FeaturesClient
from services.ranker.user_cache import UserCache

log = logging.getLogger(__name__)


def changes_of(response) -> list[tuple[str, int]]:
    return [(change.user_id, change.lsn) for change in response.changes if change.user_id]


class UserFeed:
    def __init__(self, client: FeaturesClient, cache: UserCache, *, batch_size: int = 1024, unimplemented_retry_s: float = 30.0) -> None:
        self.client, self.cache = client, cache
        self.batch_size = batch_size
        self.unimplemented_retry_s = unimplemented_retry_s
        self._stop = threading.Event()
        self._call = None
        self.connected = threading.Event()
        self.messages = 0
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name="user-feed", daemon=True)

    def start(self) -> "UserFeed":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()

    def apply(self, response, fresh_start: bool) -> None:
        """One WatchUsers message (the first of a stream from now when `fresh_start`)."""
        if fresh_start:
            self.cache.stream_started(response.watermark)
        self.cache.apply_changes(changes_of(response), response.watermark)
        self.messages += 1
        metrics.USER_CHANGES.inc(len(response.changes))
        metrics.USER_STREAM_LSN.set(response.watermark)

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            wait = backoff
            try:
                after = self.cache.stream_lsn
                fresh_start = after == 0
                self._call = self.client.stub.WatchUsers(
                    features_pb2.WatchUsersRequest(after_lsn=after, max_batch_size=self.batch_size))
                for response in self._call:
                    self.apply(response, fresh_start)
                    if fresh_start or not self.connected.is_set():
                        # Resumed (or started) and caught up to what it was sent first: live.
                        self.cache.set_live(True)
                        self.connected.set()
                        log.info("watching user changes", extra={"after_lsn": after,
                                                                 "data_lsn": response.watermark})
                    fresh_start = False
                    backoff = 0.2
                    if self._stop.is_set():
                        return
                raise grpc.RpcError("WatchUsers stream ended")
            except grpc.RpcError as error:
                self.connected.clear()
                self.cache.set_live(False)
                if self._stop.is_set():
                    return
                code = error.code() if hasattr(error, "code") else None
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    log.warning("features store rebuilt: user cache cleared")
                    self.cache.reset()
                elif code == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning("features has no WatchUsers: users are read per request",
                                extra={"features": self.client.address})
                    wait = self.unimplemented_retry_s
                self.reconnects += 1
                metrics.USER_FEED_RECONNECTS.inc()
                log.warning("user feed interrupted; resuming",
                            extra={"error": code.name if code else str(error), "after_lsn": self.cache.stream_lsn})
            except Exception:  # noqa: BLE001 - keep the feed alive whatever a message holds
                self.connected.clear()
                self.cache.set_live(False)
                log.exception("user feed failed; resuming")
            self._stop.wait(wait)
            backoff = min(backoff * 2, 5.0)
