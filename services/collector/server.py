"""gRPC edge of the collector: translates requests to the ingest core and back."""
from __future__ import annotations

import grpc

from deltarec.v1 import collector_pb2, collector_pb2_grpc

from services.collector.ingest import Ingestor
from services.common.errors import grpc_errors


class CollectorServicer(collector_pb2_grpc.CollectorServiceServicer):
    def __init__(self, ingestor: Ingestor, delta_stream=None) -> None:
        self.ingestor = ingestor
        # The change-data-capture side (Subscribe and consumer-group admin); None = not enabled.
        self.delta_stream = delta_stream

    @grpc_errors
    def IngestEvents(self, request, context):
        report = self.ingestor.ingest(request.events)
        return collector_pb2.IngestEventsResponse(
            results=report.results, accepted=report.accepted, duplicates=report.duplicates,
            rejected=report.rejected, unknown_items=report.unknown_items, commit_lsn=report.commit_lsn)

    @grpc_errors
    def StreamEvents(self, request_iterator, context):
        # Each batch is committed as it arrives: a failure later in the stream never takes back
        # what was already reported (the client retries the rest; duplicates are reported).
        response = collector_pb2.StreamEventsResponse()
        for batch_index, request in enumerate(request_iterator):
            report = self.ingestor.ingest(request.events)
            response.batches += 1
            response.accepted += report.accepted
            response.duplicates += report.duplicates
            response.rejected += report.rejected
            response.unknown_items += report.unknown_items
            for result in report.results:
                if result.status != collector_pb2.EVENT_STATUS_ACCEPTED:
                    response.not_accepted.append(result)
                    response.batch_indexes.append(batch_index)
        return response

    @grpc_errors
    def UpsertItems(self, request, context):
        return self.ingestor.upsert_items(request.items)

    @grpc_errors
    def DeleteItems(self, request, context):
        return self.ingestor.delete_items(request.item_ids)

    def _require_stream(self, context):
        if self.delta_stream is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "the delta stream is not enabled on this collector")
        return self.delta_stream

    def Subscribe(self, request_iterator, context):
        return self._require_stream(context).subscribe(request_iterator, context)

    @grpc_errors
    def ListConsumerGroups(self, request, context):
        return self._require_stream(context).list_groups()

    @grpc_errors
    def DropConsumerGroup(self, request, context):
        return self._require_stream(context).drop_group(request.consumer_group)
