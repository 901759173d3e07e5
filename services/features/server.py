"""gRPC edge of the features service: checks requests, calls the core, builds responses.

Vectors travel as `deltarec.v1.Vector`: `dim` plus little-endian packed float32 bytes (numpy:
`np.frombuffer(v.values, dtype="<f4")`), exactly as stored in item_features.embedding, so an
item vector goes from Postgres to the wire without a float-by-float conversion.
"""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Callable

from google.protobuf.timestamp_pb2 import Timestamp

from deltarec.v1 import common_pb2, features_pb2, features_pb2_grpc

from services.common.errors import InvalidArgument, Unavailable, grpc_errors
from services.contracts.event_types import PROTO_BY_NAME
from services.features import validation
from services.features.applier import FeatureApplier
from services.features.content import pack_vector
from services.features.embedder import QueryEmbedder
from services.features.item_feed import UPSERT, ItemChangeFeed
from services.features.items import ItemRecord
from services.features.store import FeatureStore
from services.features.stream_monitor import StreamMonitor
from services.features.text_model import TextModel
from services.features.user_feed import UserChangeFeed
from services.features.user_rebuild import MAX_REBUILD_USERS, UserRebuilder
from services.features.user_state import trim_history



def timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(timezone.utc))
    return stamp


def money(price: Decimal | None, currency: str | None) -> common_pb2.Money | None:
    if price is None:
        return None
    units = int(price)
    nanos = int((price - units) * 1_000_000_000)
    return common_pb2.Money(currency_code=currency or "", units=units, nanos=nanos)


class FeaturesServicer(features_pb2_grpc.FeaturesServiceServicer):
    def __init__(self, store: FeatureStore, applier: FeatureApplier, queries: QueryEmbedder,
                 feed: ItemChangeFeed, *, model_name: str, dim: int, monitor: StreamMonitor,
                 connected: Callable[[], bool], users_feed: UserChangeFeed | None = None,
                 rebuilder: UserRebuilder | None = None, text_model: TextModel | None = None) -> None:
        self.store, self.applier, self.queries, self.feed = store, applier, queries, feed
        self.users_feed, self.rebuilder = users_feed, rebuilder
        self.model_name, self.dim = model_name, dim
        self.monitor, self.connected = monitor, connected
        self.text_model = text_model

    # ------------------------------------------------------------------ conversions
    def _item(self, record: ItemRecord, include_embedding: bool) -> features_pb2.ItemFeatures:
        stats = record.stats
        message = features_pb2.ItemFeatures(
            item_id=record.item_id, active=record.listed, content_hash=record.content_hash or "",
            title=record.title, category=record.category, brand=record.brand,
            updated_lsn=record.updated_lsn, fallback_embedding=record.fallback_embedding,
            stats=features_pb2.ItemStats(views=stats.views, clicks=stats.clicks,
                                         add_to_carts=stats.add_to_carts, purchases=stats.purchases,
                                         popularity=self.applier.popularity(stats),
                                         last_interaction=timestamp(stats.last_interaction),
                                         updated_lsn=stats.updated_lsn),
            price=money(record.price, record.currency))
        if include_embedding and record.embedding is not None:
            message.embedding.dim = len(record.embedding) // 4
            message.embedding.values = record.embedding
        return message

    # ------------------------------------------------------------------ RPCs
    @staticmethod
    def _user(user_id: str, state, max_history: int) -> features_pb2.UserFeatures:
        features = features_pb2.UserFeatures(user_id=user_id)
        if state is not None:
            for entry in trim_history(state.history, max_history):
                features.history.add(item_id=entry.item_id, type=PROTO_BY_NAME[entry.event_type],
                                     timestamp=timestamp(entry.occurred_at))
            for name, count in state.counters.items():
                features.counters[name] = count
            features.recent_queries.extend(entry.query for entry in state.recent_queries)
            features.updated_lsn = state.updated_lsn
            features.seen_item_ids.extend(state.seen)
            features.purchased_item_ids.extend(item for item, purchased in state.seen.items() if purchased)
            features.seen_truncated = state.seen_truncated
        return features

    @grpc_errors
    def GetUserFeatures(self, request, context):
        user_id = validation.check_id("user_id", request.user_id)
        history_limit = validation.max_history(request.max_history)
        state, data_lsn = self.store.read_user(user_id)
        return features_pb2.GetUserFeaturesResponse(features=self._user(user_id, state, history_limit),
                                                    data_lsn=data_lsn)

    @grpc_errors
    def BatchGetUserFeatures(self, request, context):
        user_ids = validation.check_ids("user_ids", request.user_ids, validation.MAX_USER_IDS)
        history_limit = validation.max_history(request.max_history)
        states, data_lsn = self.store.read_users(user_ids)
        return features_pb2.BatchGetUserFeaturesResponse(
            users=[self._user(user_id, states[user_id], history_limit)
                   for user_id in user_ids if user_id in states], data_lsn=data_lsn)

    @grpc_errors
    def WatchUsers(self, request, context):
        if self.users_feed is None:
            raise Unavailable("WatchUsers: not enabled on this server")
        batch_size = validation.watch_users_batch_size(request.max_batch_size)
        after = validation.after_lsn(request.after_lsn)
        for page in self.users_feed.pages(after, batch_size, context.is_active):
            yield features_pb2.WatchUsersResponse(
                changes=[features_pb2.UserChange(user_id=user_id, lsn=lsn) for user_id, lsn in page.changes],
                watermark=page.watermark)

    @grpc_errors
    def GetItemFeatures(self, request, context):
        item_ids = validation.check_ids("item_ids", request.item_ids, validation.MAX_ITEM_IDS)
        records, data_lsn = self.store.read_items(item_ids)
        response = features_pb2.GetItemFeaturesResponse(data_lsn=data_lsn)
        for item_id in item_ids:
            record = records.get(item_id)
            if record is None:
                response.not_found.append(item_id)
            else:
                response.items.append(self._item(record, request.include_embedding))
        return response

    @grpc_errors
    def EmbedText(self, request, context):
        texts = validation.check_texts(request.texts)
        vectors = self.queries.embed(texts)
        return features_pb2.EmbedTextResponse(
            vectors=[features_pb2.Vector(dim=self.dim, values=pack_vector(vector)) for vector in vectors],
            model_name=self.model_name)

    @grpc_errors
    def WatchItems(self, request, context):
        batch_size = validation.watch_batch_size(request.max_batch_size)
        after = validation.after_lsn(request.after_lsn)
        for page in self.feed.pages(after, batch_size, context.is_active):
            response = features_pb2.WatchItemsResponse(watermark=page.watermark)
            for change in page.changes:
                if change.kind == UPSERT:
                    response.changes.add(kind=features_pb2.ITEM_CHANGE_KIND_UPSERT,
                                         item=self._item(change.item, include_embedding=True), lsn=change.lsn)
                else:
                    response.changes.add(kind=features_pb2.ITEM_CHANGE_KIND_REMOVE,
                                         item=features_pb2.ItemFeatures(item_id=change.item.item_id),
                                         lsn=change.lsn)
            yield response

    @grpc_errors
    def Resync(self, request, context):
        if self.text_model is not None:
            self.text_model.require_ready()      # it re-embeds: UNAVAILABLE while the model loads
        if request.all:
            report = self.applier.resync(None)
        else:
            if not request.item_ids:
                raise InvalidArgument("item_ids: give the items to recompute, or set all")
            item_ids = validation.check_ids("item_ids", request.item_ids, validation.MAX_RESYNC_IDS)
            report = self.applier.resync(item_ids)
        return features_pb2.ResyncResponse(recomputed=report.recomputed, re_embedded=report.re_embedded,
                                           not_found=report.not_found or [])

    @grpc_errors
    def RebuildUsers(self, request, context):
        user_ids = validation.check_ids("user_ids", request.user_ids, MAX_REBUILD_USERS)
        report = self.rebuilder.rebuild(user_ids)
        return features_pb2.RebuildUsersResponse(rebuilt=report.rebuilt, removed=report.removed,
                                                 events=report.events, data_lsn=report.data_lsn)

    @grpc_errors
    def Status(self, request, context):
        applier = self.applier
        applied = applier.progress.applied_lsn
        lag = self.monitor.lag(applied, self.store.current_wal_lsn(), applier.latest_commit_time)
        counts = self.store.counts()
        model = self.text_model
        return features_pb2.FeaturesServiceStatusResponse(
            applied_lsn=applied, server_lsn=lag.server_lsn, lag_bytes=lag.lag_bytes,
            lag_seconds=lag.lag_seconds, items=counts["items"], active_items=counts["active_items"],
            users=counts["users"], embeddings_computed=applier.embeddings_computed,
            embeddings_skipped=applier.embeddings_skipped, fallback_embeddings=applier.fallback_embeddings,
            model_name=self.model_name, connected=self.connected(),
            snapshot_done=applier.progress.snapshot_done,
            text_model_ready=model is None or model.ready,
            text_model_state="ready" if model is None else model.state,
            text_model_load_seconds=0.0 if model is None else model.load_seconds)
