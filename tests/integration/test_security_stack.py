"""The suite over mutual TLS with authentication, for real: collector, features and ranker processes
configured only by the environment (scripts/pki.DevPki: a CA made at run time, a certificate per
service, a tokens file — what `DELTAREC_RUN_SECURE=1 make run` uses), the features service
consuming the delta stream over mTLS with the service token, and the ranker calling features over
mTLS authenticated by its certificate identity alone."""
from __future__ import annotations

import importlib.util
import uuid

import grpc
import pytest

from deltarec.v1 import (collector_pb2, collector_pb2_grpc, common_pb2, features_pb2, features_pb2_grpc,
                         ranker_pb2, ranker_pb2_grpc)
from scripts.pki import DevPki
from services.common import channels
from services.common.config import SecurityConfig, load
from tests.support import wait_until

pytestmark = pytest.mark.integration

if importlib.util.find_spec("services.features.__main__") is None:
    pytest.skip("the features service is not in this checkout yet", allow_module_level=True)

ITEMS = [f"sec-item-{n}" for n in range(8)]


def test_delta_stream_and_ranker_to_features_over_mutual_tls_with_tokens(
        tmp_path, infra_env, database_url, etcd_prefix, start_service):
    pki = DevPki(tmp_path / "pki")
    base = {"DATABASE_URL": database_url, "ETCD_ENDPOINT": infra_env.etcd_endpoint, "ETCD_PREFIX": etcd_prefix,
            "GRPC_PORT": "0", "METRICS_PORT": "0", "LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_S": "2",
            "COLLECTOR_HEARTBEAT_S": "0.5"}
    collector_process = start_service("services.collector", {**base, **pki.service_env("collector")})
    features_process = start_service("services.features", {
        **base, **pki.service_env("features"), "AUTH_CLIENT_TOKEN_FILE": str(pki.token_file("service")),
        "COLLECTOR_ADDRESS": collector_process.address, "FEATURES_TORCH_THREADS": "1"}, timeout_s=240)
    ranker_process = start_service("services.ranker", {
        **base, **pki.service_env("ranker"), "FEATURES_ADDRESS": features_process.address,
        "RANKER_REPLICA_ID": "ranker-mtls", "RANKER_USER_CACHE_TTL_S": "0.2"}, timeout_s=240)

    # This test is the storefront: its own certificate and token, as any other client.
    def client(role: str | None, name: str = "storefront", **extra) -> SecurityConfig:
        return load(SecurityConfig, {**pki.client_env(role, name), **extra})

    storefront = client("storefront")
    collector = collector_pb2_grpc.CollectorServiceStub(
        channels.make_channel(collector_process.address, channels.COLLECTOR, security=storefront))
    features = features_pb2_grpc.FeaturesServiceStub(
        channels.make_channel(features_process.address, channels.FEATURES, security=client("service", "checker")))
    ranker = ranker_pb2_grpc.RankerServiceStub(
        channels.make_channel(ranker_process.address, channels.RANKER, security=storefront))

    collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=[
        common_pb2.Item(item_id=item, title=f"Rose Lip Balm {n}", category="Beauty > Lips", active=True)
        for n, item in enumerate(ITEMS)]), timeout=30)
    bought = ITEMS[3]
    collector.IngestEvents(collector_pb2.IngestEventsRequest(events=[
        common_pb2.Event(event_id=f"sec-{uuid.uuid4().hex}", type=common_pb2.EVENT_TYPE_PURCHASE,
                         user_id="u-buyer", item_id=bought)]), timeout=30)

    # The features service consumed both writes over the mTLS delta stream.
    def history():
        response = features.GetUserFeatures(features_pb2.GetUserFeaturesRequest(user_id="u-buyer"), timeout=10)
        return [entry.item_id for entry in response.features.history]
    assert wait_until(lambda: bought in history(), "the purchase to reach features over the delta stream")

    # The ranker's catalog came over WatchItems and the user's history over GetUserFeatures, both
    # authenticated by the ranker's certificate: the purchased item is left out for the buyer only.
    def recommended(user: str) -> list[str]:
        answer = ranker.Recommend(ranker_pb2.RecommendRequest(user_id=user, k=len(ITEMS)), timeout=10)
        return [item.item_id for item in answer.items]
    wait_until(lambda: len(recommended("u-nobody")) == len(ITEMS), "the ranker to know every item")
    assert bought in recommended("u-nobody")
    assert wait_until(lambda: bought not in recommended("u-buyer") and recommended("u-buyer"),
                      "the ranker to leave out what the buyer bought")

    # And the roles hold on the real services.
    with pytest.raises(grpc.RpcError) as refused:
        features_pb2_grpc.FeaturesServiceStub(channels.make_channel(
            features_process.address, channels.FEATURES, security=storefront)).GetUserFeatures(
            features_pb2.GetUserFeaturesRequest(user_id="u-buyer"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as refused:
        collector.DropConsumerGroup(collector_pb2.DropConsumerGroupRequest(consumer_group="features"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as refused:
        ranker_pb2_grpc.RankerServiceStub(channels.make_channel(
            ranker_process.address, channels.RANKER, security=client(None))).Recommend(
            ranker_pb2.RecommendRequest(user_id="u-buyer"), timeout=10)
    # A certificate from the CA authenticates, but "storefront" is no identity with a role.
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "storefront (no role)" in refused.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        ranker_pb2_grpc.RankerServiceStub(channels.make_channel(
            ranker_process.address, channels.RANKER,
            security=client(None, AUTH_CLIENT_TOKEN="not-a-token-of-this-suite"))).Recommend(
            ranker_pb2.RecommendRequest(user_id="u-buyer"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
