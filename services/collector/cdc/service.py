"""gRPC edge of the delta stream, and its construction from the collector's config.

`DeltaStreamService` is what CollectorServicer routes Subscribe / ListConsumerGroups /
DropConsumerGroup to; it only moves messages between gRPC and the core (hub.py, subscription.py).
"""
from __future__ import annotations

import logging
import threading

import grpc

from deltarec.v1 import collector_pb2

from services.collector.cdc.slots import SlotStore, default_slot_prefix, ensure_publication, libpq_dsn
from services.collector.cdc.hub import CdcHub, StreamSettings
from services.common.errors import InvalidArgument, bounded, client_gone, status_for
from services.common.etcd import Etcd

log = logging.getLogger(__name__)


class DeltaStreamService:
    def __init__(self, hub: CdcHub) -> None:
        self.hub = hub

    def subscribe(self, request_iterator, context):
        try:
            first = next(request_iterator)
        except StopIteration:
            return
        except grpc.RpcError:
            return
        subscription = None
        try:
            if first.WhichOneof("message") != "start":
                raise InvalidArgument("the first message must be `start`")
            start = first.start
            subscription = self.hub.open(start.consumer_group, list(start.tables), start.max_batch_size,
                                         start.resume_after_lsn)
            context.add_callback(lambda: subscription.cancel("client gone", by_server=False))
            threading.Thread(target=self._read_acks, args=(request_iterator, subscription),
                             name=f"cdc-acks-{start.consumer_group}", daemon=True).start()
            yield from subscription.responses()
        except Exception as error:  # noqa: BLE001 - the edge answers every failure with a status
            if type(error) is Exception and not error.args:
                raise   # context.abort() from the interceptor (an unparsable message)
            if client_gone(context):
                return
            code, message = status_for(error)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("Subscribe failed")
            context.abort(code, bounded(message))
        finally:
            if subscription is not None:
                subscription.close()

    @staticmethod
    def _read_acks(request_iterator, subscription) -> None:
        try:
            for request in request_iterator:
                kind = request.WhichOneof("message")
                if kind == "ack":
                    subscription.ack(request.ack.lsn)
                elif kind == "start":
                    log.warning("second `start` on a subscription ignored", extra={"group": subscription.group})
        except Exception:  # noqa: BLE001 - the client went away
            pass
        finally:
            subscription.cancel("client closed its stream", by_server=False)

    def list_groups(self) -> collector_pb2.ListConsumerGroupsResponse:
        return self.hub.list_groups()

    def drop_group(self, group: str) -> collector_pb2.DropConsumerGroupResponse:
        return self.hub.drop_group(group)

    def close(self) -> None:
        self.hub.close()


def build_hub(config, engine, collector_id: str, etcd: Etcd | None = None) -> CdcHub:
    tables = [table.strip() for table in config.cdc_tables.split(",") if table.strip()]
    ensure_publication(engine, config.cdc_publication, tables)
    prefix = config.slot_prefix or default_slot_prefix(config.database_url)
    if etcd is None:
        etcd = Etcd.from_config(config)
    settings = StreamSettings(heartbeat_s=config.heartbeat_s, buffer_deltas=config.buffer_deltas,
                              max_unacked_batches=config.max_unacked_batches,
                              lease_ttl_s=config.slot_lease_ttl_s, fence_s=config.slot_busy_fence_s)
    return CdcHub(SlotStore(engine, prefix), libpq_dsn(config.database_url), config.cdc_publication,
                  tables, etcd, collector_id, settings)


def build_delta_stream(config, engine, collector_id: str, etcd: Etcd) -> DeltaStreamService:
    """The delta stream of services/collector/__main__.py (when COLLECTOR_CDC_ENABLED is on)."""
    return DeltaStreamService(build_hub(config, engine, collector_id, etcd))
