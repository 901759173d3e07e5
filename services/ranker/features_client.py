"""The ranker's client of the features service: user histories (GetUserFeatures,
BatchGetUserFeatures), query embeddings (EmbedText), item popularity (GetItemFeatures) and the
applied LSN (Status). The item feed
(WatchItems) is item_feed.py, the user-change feed (WatchUsers) user_feed.py."""
from __future__ import annotations

import grpc
import numpy as np

from deltarec.v1 import features_pb2, features_pb2_grpc

from services.common import channels
from services.common.errors import InvalidArgument
from services.contracts.event_types import MODEL_INDEX_BY_PROTO, EventType
from services.ranker.user_cache import FeaturesUnavailable, UserHistory


def make_channel(address: str) -> grpc.Channel:
    return channels.make_channel(address, channels.FEATURES, options=[
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ])


def user_history_of(features, data_lsn: int) -> UserHistory:
    """A UserFeatures message as the ranker keeps it."""
    entries = [entry for entry in features.history if entry.item_id]
    return UserHistory(
        item_ids=tuple(entry.item_id for entry in entries),
        event_types=tuple(int(MODEL_INDEX_BY_PROTO.get(entry.type, EventType.PAD)) for entry in entries),
        timestamps=tuple(entry.timestamp.seconds + entry.timestamp.nanos / 1e9 for entry in entries),
        data_lsn=data_lsn, updated_lsn=features.updated_lsn,
        seen_item_ids=tuple(features.seen_item_ids), purchased_item_ids=tuple(features.purchased_item_ids))


class FeaturesClient:
    """User histories and query embeddings from the features service."""

    def __init__(self, address: str, timeout_s: float = 1.0, channel: grpc.Channel | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.channel = channel or make_channel(address)
        self.stub = features_pb2_grpc.FeaturesServiceStub(self.channel)
        self._batch_supported = True

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else max(0.001, min(self.timeout_s, timeout_s * 0.9))

    def user_history(self, user_id: str, max_history: int, timeout_s: float | None) -> UserHistory:
        try:
            response = self.stub.GetUserFeatures(
                features_pb2.GetUserFeaturesRequest(user_id=user_id, max_history=max_history),
                timeout=self._timeout(timeout_s))
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return UserHistory()
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:   # the caller's value, not an outage
                raise InvalidArgument(f"user_id: refused by features: {(error.details() or '')[:200]}") from None
            raise FeaturesUnavailable(f"GetUserFeatures: {error.code().name}") from None
        return user_history_of(response.features, response.data_lsn)

    def item_popularity(self, item_ids: list[str], timeout_s: float | None = None) -> dict[str, float]:
        """Features' current popularity of up to 1000 items (items it does not know are left out)."""
        try:
            response = self.stub.GetItemFeatures(
                features_pb2.GetItemFeaturesRequest(item_ids=item_ids, include_embedding=False),
                timeout=self._timeout(timeout_s))
        except grpc.RpcError as error:
            raise FeaturesUnavailable(f"GetItemFeatures: {error.code().name}") from None
        return {item.item_id: float(item.stats.popularity) for item in response.items}

    def user_histories(self, user_ids: list[str], max_history: int,
                       timeout_s: float | None) -> dict[str, UserHistory]:
        """Several users in one read (BatchGetUserFeatures), all exact as of one LSN; users
        features does not know get an empty history at that LSN. One by one against a features
        service without the batch call."""
        if not self._batch_supported:
            return {user_id: self.user_history(user_id, max_history, timeout_s) for user_id in user_ids}
        try:
            response = self.stub.BatchGetUserFeatures(
                features_pb2.BatchGetUserFeaturesRequest(user_ids=user_ids, max_history=max_history),
                timeout=self._timeout(timeout_s))
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._batch_supported = False
                return self.user_histories(user_ids, max_history, timeout_s)
            raise FeaturesUnavailable(f"BatchGetUserFeatures: {error.code().name}") from None
        found = {features.user_id: user_history_of(features, response.data_lsn) for features in response.users}
        empty = UserHistory(data_lsn=response.data_lsn)
        return {user_id: found.get(user_id, empty) for user_id in user_ids}

    def encode(self, texts: list[str]) -> np.ndarray:
        try:
            response = self.stub.EmbedText(features_pb2.EmbedTextRequest(texts=texts),
                                           timeout=self.timeout_s * 5)
        except grpc.RpcError as error:
            raise FeaturesUnavailable(f"EmbedText: {error.code().name}") from None
        return np.stack([np.frombuffer(vector.values, dtype="<f4") for vector in response.vectors])

    def applied_lsn(self, timeout_s: float = 5.0) -> int:
        return self.stub.Status(features_pb2.FeaturesServiceStatusRequest(), timeout=timeout_s).applied_lsn

    def close(self) -> None:
        self.channel.close()
