"""gRPC edge of the ranker: messages to the plain core and back, errors to statuses.
FAILED_PRECONDITION for an unmet min_data_lsn carries this replica's watermark in the message and
in the trailing metadata key `deltarec-data-lsn`."""
from __future__ import annotations

import functools
import math
import time

from deltarec.v1 import common_pb2, ranker_pb2, ranker_pb2_grpc

from services.common.errors import InvalidArgument, Unavailable, grpc_errors
from services.common.validation import check_count, check_id, check_ids, check_texts
from services.feedback.attribution import Attribution
from services.feedback.variant_outcomes import is_server_failure
from services.ranker import metrics
from services.ranker.admission import Overloaded
from services.ranker.answer import Answer
from services.ranker.filters import NO_FILTERS, FilterSpec
from services.ranker.index_digest import IndexDigester
from services.ranker.read_your_writes import DataBehind
from services.ranker.repair import ReplicaRepair
from services.ranker.replica import RankerReplica
from services.ranker.session import SessionEvent

WATERMARK_METADATA = "deltarec-data-lsn"
MAX_DETAIL_BUCKETS = 64

# Request limits of the filters and the session (documented in ranker.proto).
MAX_CATEGORIES = 64
MAX_CATEGORY_BYTES = 256
MAX_EXCLUDED = 10_000
MAX_SESSION_EVENTS = 200


def time_remaining(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e6 else max(remaining, 0.0)


def filters_from(request, default: FilterSpec) -> FilterSpec:
    if not request.HasField("filters"):
        return default
    f = request.filters
    low = f.min_price if f.HasField("min_price") else None
    high = f.max_price if f.HasField("max_price") else None
    for name, value in (("filters.min_price", low), ("filters.max_price", high)):
        if value is not None and not math.isfinite(value):
            raise InvalidArgument(f"{name}: must be a finite number")
    # Exclusions left unset keep the default (the deployment's policy for Recommend).
    purchased = f.exclude_purchased if f.HasField("exclude_purchased") else default.exclude_purchased
    seen = f.exclude_seen if f.HasField("exclude_seen") else default.exclude_seen
    categories = check_texts("filters.categories", f.categories, MAX_CATEGORIES, MAX_CATEGORY_BYTES)
    excluded = check_ids("filters.exclude_item_ids", f.exclude_item_ids, MAX_EXCLUDED, allow_empty=True)
    return FilterSpec(exclude_purchased=purchased, exclude_seen=seen,
                      categories=tuple(c for c in categories if c), min_price=low, max_price=high,
                      exclude_item_ids=tuple(excluded))


def session_from(request) -> tuple[SessionEvent, ...]:
    check_count("session", len(request.session), MAX_SESSION_EVENTS)
    for position, event in enumerate(request.session):
        check_id(f"session[{position}].item_id", event.item_id)
    return tuple(SessionEvent(event.item_id, event.type,
                              event.timestamp.seconds + event.timestamp.nanos / 1e9
                              if event.HasField("timestamp") else None)
                 for event in request.session)


def _filled(response, answer: Answer):
    """`response` with the answer's items and freshness, built in place (items.add and the
    sub-message fields set directly: half the Python time of constructing ScoredItem and
    Freshness messages and copying them in)."""
    add = response.items.add
    for item in answer.items:
        add(item_id=item.item_id, score=item.score, reason=item.reason, title=item.title)
    response.freshness.model_version = answer.model_version
    response.freshness.data_lsn = answer.data_lsn
    return response


def _variant(response, answer: Answer):
    response.variant.name = answer.variant
    response.variant.model_version = answer.model_version
    return response


def refusals_reported(method):
    """What the core's request path (request_path.py: read-your-writes wait, then admission)
    refused, made visible: this replica's watermark in the trailers of FAILED_PRECONDITION, and
    the admission refusals counted per method."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Overloaded:
            metrics.REJECTED.labels(method.__name__).inc()
            raise
        except DataBehind as behind:
            context.set_trailing_metadata(((WATERMARK_METADATA, str(behind.watermark)),))
            raise
    return wrapper


def variant_outcomes_counted(method):
    """Counts each Recommend/Search per (model version, variant) it was served by, and whether it
    failed for the replica's own reasons (services/feedback/variant_outcomes.py): what the canary
    decider's error-rate abort reads from the registrations. A failed request has no answer to
    name its variant, so it is charged to the variant its user routes to."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            response = method(self, request, context)
        except Exception as error:
            if is_server_failure(error):
                bundle, variant = self.replica.state.route(request.user_id)
                self.replica.outcomes.record(bundle.version if bundle is not None else 0, variant, True)
            raise
        self.replica.outcomes.record(response.variant.model_version, response.variant.name, False)
        return response
    return wrapper


class RankerServicer(ranker_pb2_grpc.RankerServiceServicer):
    def __init__(self, replica: RankerReplica, digester: IndexDigester | None = None,
                 repair: ReplicaRepair | None = None, attribution: Attribution | None = None) -> None:
        self.replica, self.digester, self.repair = replica, digester, repair
        self.attribution = attribution     # None: answers carry no recommendation_id

    def _stamp(self, answer: Answer, kind: str, user_id: str) -> str:
        return self.attribution.stamp(answer, kind, user_id) if self.attribution is not None else ""

    @grpc_errors
    @refusals_reported
    @variant_outcomes_counted
    def Recommend(self, request, context):
        recommender = self.replica.recommender
        answer = recommender.recommend(
            request.user_id, request.k, filters_from(request, recommender.default_filters),
            request.min_data_lsn, time_remaining(context), session=session_from(request))
        return _variant(_filled(ranker_pb2.RecommendResponse(
            cold_start=answer.cold_start, degraded=answer.degraded,
            recommendation_id=self._stamp(answer, "recommend", request.user_id)), answer), answer)

    @grpc_errors
    @refusals_reported
    @variant_outcomes_counted
    def Search(self, request, context):
        answer = self.replica.searcher.search(
            request.query, request.user_id, request.k, filters_from(request, NO_FILTERS),
            request.min_data_lsn, time_remaining(context))
        return _variant(_filled(ranker_pb2.SearchResponse(
            degraded=answer.degraded, recommendation_id=self._stamp(answer, "search", request.user_id)),
            answer), answer)

    @grpc_errors
    @refusals_reported
    def SimilarItems(self, request, context):
        answer = self.replica.recommender.similar(
            request.item_id, request.k, filters_from(request, NO_FILTERS), time_remaining(context))
        return _filled(ranker_pb2.SimilarItemsResponse(recommendation_id=self._stamp(answer, "similar", "")),
                       answer)

    @grpc_errors
    def Status(self, request, context):
        status = self.replica.status()
        return ranker_pb2.RankerServiceStatusResponse(
            replica_id=status["replica_id"],
            freshness=common_pb2.Freshness(model_version=status["model_version"],
                                           data_lsn=status["data_lsn"]),
            index_size=status["index_size"], index_checksum=status["index_checksum"],
            canary_version=status["canary_version"], canary_share=status["canary_share"],
            refused_version=status["refused_version"], refused_reason=status["refused_reason"],
            swaps=status["swaps"])

    @grpc_errors
    def IndexDigest(self, request, context):
        taken = self.digester.take()
        buckets = list(request.detail_buckets)
        if len(buckets) > MAX_DETAIL_BUCKETS:
            raise InvalidArgument(f"detail_buckets: at most {MAX_DETAIL_BUCKETS}")
        for n, bucket in enumerate(buckets):
            if bucket >= taken.digest.num_buckets:
                raise InvalidArgument(f"detail_buckets[{n}]: must be < {taken.digest.num_buckets}")
        routing = self.replica.state.routing
        return ranker_pb2.IndexDigestResponse(
            replica_id=self.replica.replica_id, data_lsn=taken.data_lsn, num_buckets=taken.digest.num_buckets,
            buckets=[ranker_pb2.BucketDigest(bucket=b, count=d.count, xor=d.xor) for b, d in taken.digest.items()],
            entries=[ranker_pb2.IndexEntry(item_id=i, fingerprint=f) for i, f in self.digester.entries(taken, buckets)],
            items=taken.items, model_version=routing.current.version if routing.current else 0)

    @grpc_errors
    def Reload(self, request, context):
        if not request.reload_model and not request.resync_index:
            raise InvalidArgument("reload_model or resync_index: say what to reload")
        timeout = time_remaining(context)
        timeout = 120.0 if timeout is None else timeout
        started = time.monotonic()
        if request.resync_index and not self.repair.resync_index(timeout):
            raise Unavailable("the index resync did not finish within the deadline; it goes on")
        if request.reload_model and not self.repair.reload_model(max(timeout - (time.monotonic() - started), 0)):
            raise Unavailable("the model is still loading; it goes on")
        status = self.replica.status()
        return ranker_pb2.ReloadResponse(model_version=status["model_version"], data_lsn=status["data_lsn"],
                                         index_size=self.replica.catalog.text_index.size)
