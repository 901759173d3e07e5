"""The loop of the ranker's etcd clients (the model watcher, the registration): do a step, idle,
repeat; while etcd is unreachable keep serving and retry with a doubling pause."""
from __future__ import annotations

import logging
import threading
from typing import Callable

from services.common.etcd import EtcdUnavailable

MAX_BACKOFF_S = 5.0


def retry_against_etcd(step: Callable[[], None], idle: Callable[[], None], stop: threading.Event, *,
                       first_backoff_s: float, log: logging.Logger, unreachable: str, failed: str) -> None:
    """Runs `step()` then `idle()` until `stop` is set. A step that fails is retried after a pause
    that starts at `first_backoff_s` and doubles up to MAX_BACKOFF_S (back to the start after a
    step that succeeds); `unreachable` is logged (to the caller's `log`) as a warning when etcd
    is down, `failed` with the traceback for anything else (the loop survives it either way)."""
    backoff = first_backoff_s
    while not stop.is_set():
        try:
            step()
        except (EtcdUnavailable, ValueError) as error:   # ValueError: etcd3's "failed node"
            log.warning(unreachable, extra={"error": str(error)[:200]})
        except Exception:  # noqa: BLE001 - the loop must survive anything
            log.exception(failed)
        else:
            backoff = first_backoff_s
            idle()
            continue
        stop.wait(backoff)
        backoff = min(backoff * 2, MAX_BACKOFF_S)
