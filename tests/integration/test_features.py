"""The features service end to end: real collector (delta stream over logical replication), real
features process, real Postgres and etcd.

One collector and one features process serve the module (its own database); every test uses
item and user ids of its own. Waiting is by LSN: after a write, the test reads
pg_current_wal_insert_lsn() (not pg_current_wal_lsn(): with synchronous_commit off, a commit can
still sit in the WAL buffers) and waits until the feature store's watermark (data_lsn) reaches it, which
the service guarantees once it has applied everything committed before (including "caught up"
positions from the collector's heartbeats when our tables are idle).
"""
from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timedelta, timezone

import grpc
import numpy as np
import pytest
import sqlalchemy as sa

from deltarec.v1 import collector_pb2, collector_pb2_grpc, common_pb2, features_pb2, features_pb2_grpc
from scripts.launch import ServiceProcess
from services.common.etcd import Etcd
from services.contracts.item_text import ItemText, embedding_text
from services.ranker.features_client import FeaturesClient
from services.ranker.user_cache import UserCache
from services.ranker.user_feed import UserFeed
from tests.support import channel_to, wait_until, wal_lsn

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def etcd_prefix_module() -> str:
    return f"/test-{uuid.uuid4().hex[:10]}/"


@pytest.fixture(scope="module")
def suite(infra_env, database_url, etcd_prefix_module, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    env = {"DATABASE_URL": database_url, "ETCD_ENDPOINT": infra_env.etcd_endpoint,
           "ETCD_PREFIX": etcd_prefix_module, "GRPC_PORT": "0", "METRICS_PORT": "0", "LOG_LEVEL": "INFO",
           "SHUTDOWN_GRACE_S": "2", "COLLECTOR_HEARTBEAT_S": "0.5"}
    collector = ServiceProcess("services.collector", env, log_dir=logs).start()
    features = ServiceProcess("services.features", {**env, "COLLECTOR_ADDRESS": collector.address,
                                                    "FEATURES_TORCH_THREADS": "1"}, log_dir=logs).start()
    yield collector, features
    features.stop(timeout_s=20)
    collector.stop(timeout_s=20)


@pytest.fixture(scope="module")
def collector(suite):
    channel = channel_to(suite[0])
    yield collector_pb2_grpc.CollectorServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def features(suite):
    channel = channel_to(suite[1])
    yield features_pb2_grpc.FeaturesServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def encoder():
    from services.common.text_encoder import TextEncoder
    return TextEncoder(num_threads=1)


@pytest.fixture
def ids() -> str:
    return uuid.uuid4().hex[:8]


def caught_up(features, engine) -> int:
    """Waits until the feature store has applied everything committed so far; returns its LSN."""
    target = wal_lsn(engine)
    return wait_until(lambda: (lambda s: s.applied_lsn if s.applied_lsn >= target else 0)(
        features.Status(features_pb2.FeaturesServiceStatusRequest(), timeout=10)),
        f"features to apply up to LSN {target}")


def item(item_id: str, title: str, *, price: tuple[int, int] = (4, 500_000_000), description: str = "",
         category: str = "Beauty > Lips", brand: str = "Belle Rose", active: bool = True) -> common_pb2.Item:
    return common_pb2.Item(item_id=item_id, title=title, description=description, category=category,
                           brand=brand, active=active,
                           price=common_pb2.Money(currency_code="EUR", units=price[0], nanos=price[1]))


def upsert(collector, *items):
    response = collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=items), timeout=30)
    assert response.upserted == len(items), response


def event(event_id: str, kind: str, user: str, item_id: str = "", query: str = "", when: datetime = T0):
    message = common_pb2.Event(event_id=event_id, type=getattr(common_pb2, f"EVENT_TYPE_{kind.upper()}"),
                               user_id=user, item_id=item_id, query=query)
    message.timestamp.FromDatetime(when)
    return message


def ingest(collector, *events):
    response = collector.IngestEvents(collector_pb2.IngestEventsRequest(events=events), timeout=30)
    assert response.accepted == len(events), response


def status(features):
    return features.Status(features_pb2.FeaturesServiceStatusRequest(), timeout=10)


def get_item(features, item_id: str) -> features_pb2.ItemFeatures:
    request = features_pb2.GetItemFeaturesRequest(item_ids=[item_id], include_embedding=True)
    response = features.GetItemFeatures(request, timeout=10)
    assert list(response.not_found) == [], response
    return response.items[0]


def vector(message: features_pb2.Vector) -> np.ndarray:
    assert message.dim == 384 and len(message.values) == 384 * 4
    return np.frombuffer(message.values, dtype="<f4")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------------ items

def test_price_only_update_does_not_re_embed_and_a_title_change_does(collector, features, engine, ids):
    item_id = f"{ids}-balm"
    upsert(collector, item(item_id, "Rose Lip Balm"))
    caught_up(features, engine)
    first = get_item(features, item_id)
    before = status(features)

    upsert(collector, item(item_id, "Rose Lip Balm", price=(9, 990_000_000)))
    caught_up(features, engine)
    repriced = get_item(features, item_id)
    after_price = status(features)
    assert (repriced.price.units, repriced.price.nanos) == (9, 990_000_000)
    assert repriced.content_hash == first.content_hash
    assert repriced.embedding.values == first.embedding.values
    assert after_price.embeddings_computed == before.embeddings_computed
    assert after_price.embeddings_skipped == before.embeddings_skipped + 1

    upsert(collector, item(item_id, "Rose Lip Balm with Shea Butter", price=(9, 990_000_000)))
    caught_up(features, engine)
    retitled = get_item(features, item_id)
    after_title = status(features)
    assert retitled.title == "Rose Lip Balm with Shea Butter"
    assert retitled.content_hash != first.content_hash
    assert retitled.embedding.values != first.embedding.values
    assert after_title.embeddings_computed == after_price.embeddings_computed + 1
    assert after_title.embeddings_skipped == after_price.embeddings_skipped
    assert retitled.updated_lsn > repriced.updated_lsn > first.updated_lsn


def test_embeddings_equal_a_direct_model_call(collector, features, engine, encoder, ids):
    text = ItemText("Hydrating Face Cream 50 ml", "Rich cream with hyaluronic acid for dry skin",
                    "Beauty > Skin Care", "Lumiere")
    upsert(collector, item(f"{ids}-cream", text.title, description=text.description, category=text.category,
                           brand=text.brand))
    caught_up(features, engine)
    stored = vector(get_item(features, f"{ids}-cream").embedding)
    direct = encoder.encode([embedding_text(text)])[0]
    assert cosine(stored, direct) > 0.999
    assert abs(float(np.linalg.norm(stored)) - 1.0) < 1e-4

    queries = ["rose lip balm", "sunscreen spf 50 for sensitive skin"]
    response = features.EmbedText(features_pb2.EmbedTextRequest(texts=queries), timeout=30)
    assert response.model_name == "sentence-transformers/all-MiniLM-L6-v2"
    for message, direct in zip(response.vectors, encoder.encode(queries)):
        assert cosine(vector(message), direct) > 0.999
    # Cached the second time, same answer.
    again = features.EmbedText(features_pb2.EmbedTextRequest(texts=queries[:1]), timeout=30)
    assert again.vectors[0].values == response.vectors[0].values


def test_unusable_text_gets_a_fallback_vector(collector, features, engine, ids):
    before = status(features)
    upsert(collector, item(f"{ids}-blank", "???", category="", brand=""))
    caught_up(features, engine)
    blank = get_item(features, f"{ids}-blank")
    assert blank.fallback_embedding and blank.active
    assert abs(float(np.linalg.norm(vector(blank.embedding))) - 1.0) < 1e-4
    assert status(features).fallback_embeddings == before.fallback_embeddings + 1


def test_get_item_features_batch_with_not_found(collector, features, engine, ids):
    upsert(collector, item(f"{ids}-a", "Matte Lipstick"), item(f"{ids}-b", "Volumizing Mascara"))
    caught_up(features, engine)
    response = features.GetItemFeatures(features_pb2.GetItemFeaturesRequest(
        item_ids=[f"{ids}-b", f"{ids}-missing", f"{ids}-a", f"{ids}-b"]), timeout=10)
    assert [i.item_id for i in response.items] == [f"{ids}-b", f"{ids}-a"]
    assert list(response.not_found) == [f"{ids}-missing"]
    assert not response.items[0].embedding.values          # not requested
    assert response.items[0].content_hash and response.data_lsn > 0


def test_delete_and_deactivation_leave_the_active_set(collector, features, engine, ids):
    upsert(collector, item(f"{ids}-x", "Nail Polish Red"), item(f"{ids}-y", "Nail Polish Blue"))
    caught_up(features, engine)
    upsert(collector, item(f"{ids}-y", "Nail Polish Blue", active=False))
    collector.DeleteItems(collector_pb2.DeleteItemsRequest(item_ids=[f"{ids}-x"]), timeout=10)
    caught_up(features, engine)
    request = features_pb2.GetItemFeaturesRequest(item_ids=[f"{ids}-x", f"{ids}-y"])
    response = features.GetItemFeatures(request, timeout=10)
    assert list(response.not_found) == [f"{ids}-x"]
    assert [(i.item_id, i.active) for i in response.items] == [(f"{ids}-y", False)]


# ------------------------------------------------------------------------------ users

def test_a_purchase_shows_in_user_features(collector, features, engine, ids):
    user = f"{ids}-user"
    ingest(collector, event(f"{ids}-1", "view", user, f"{ids}-serum", when=T0),
           event(f"{ids}-2", "search", user, query="vitamin c serum", when=T0 + timedelta(seconds=1)),
           event(f"{ids}-3", "purchase", user, f"{ids}-serum", when=T0 + timedelta(seconds=2)))
    caught_up(features, engine)
    response = features.GetUserFeatures(features_pb2.GetUserFeaturesRequest(user_id=user), timeout=10)
    history = response.features.history
    assert [(h.item_id, h.type) for h in history] == [(f"{ids}-serum", common_pb2.EVENT_TYPE_VIEW),
                                                      (f"{ids}-serum", common_pb2.EVENT_TYPE_PURCHASE)]
    assert history[-1].timestamp.ToDatetime(tzinfo=timezone.utc) == T0 + timedelta(seconds=2)
    assert dict(response.features.counters) == {"view": 1, "search": 1, "purchase": 1}
    assert list(response.features.recent_queries) == ["vitamin c serum"]
    assert response.data_lsn >= response.features.updated_lsn > 0

    request = features_pb2.GetUserFeaturesRequest(user_id=user, max_history=1)
    trimmed = features.GetUserFeatures(request, timeout=10)
    assert [h.type for h in trimmed.features.history] == [common_pb2.EVENT_TYPE_PURCHASE]

    # Item statistics moved with the events.
    upsert(collector, item(f"{ids}-serum", "Vitamin C Serum"))
    caught_up(features, engine)
    stats = get_item(features, f"{ids}-serum").stats
    assert (stats.views, stats.purchases) == (1, 1) and stats.popularity > 0
    assert stats.last_interaction.ToDatetime(tzinfo=timezone.utc) == T0 + timedelta(seconds=2)


def test_unknown_user_gets_an_empty_history(features):
    request = features_pb2.GetUserFeaturesRequest(user_id="nobody-ever")
    response = features.GetUserFeatures(request, timeout=10)
    assert response.features.user_id == "nobody-ever"
    assert list(response.features.history) == [] and dict(response.features.counters) == {}


def test_invalid_requests_name_the_field(features):
    def invalid(call, request) -> str:
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return info.value.details()
    assert invalid(features.GetUserFeatures, features_pb2.GetUserFeaturesRequest()) == "user_id: required"
    assert invalid(features.EmbedText, features_pb2.EmbedTextRequest()) == "texts: must not be empty"
    too_long = features_pb2.EmbedTextRequest(texts=["ok", "x" * 3000])
    assert invalid(features.EmbedText, too_long).startswith("texts[1]:")
    assert invalid(features.EmbedText, features_pb2.EmbedTextRequest(texts=["q"] * 300)).startswith("texts:")
    assert invalid(features.GetItemFeatures,
                   features_pb2.GetItemFeaturesRequest()) == "item_ids: must not be empty"
    assert invalid(features.Resync, features_pb2.ResyncRequest()).startswith("item_ids:")


# ------------------------------------------------------------------------------ WatchItems

def watch_until(features, after_lsn: int, target_lsn: int, *, max_batch_size: int = 0):
    """Every change WatchItems(after_lsn) sends until its watermark reaches target_lsn."""
    request = features_pb2.WatchItemsRequest(after_lsn=after_lsn, max_batch_size=max_batch_size)
    call = features.WatchItems(request, timeout=60)
    changes, watermarks = [], []
    for response in call:
        changes.extend(response.changes)
        watermarks.append(response.watermark)
        if response.watermark >= target_lsn:
            break
    call.cancel()
    assert watermarks == sorted(watermarks)
    return changes, watermarks


def test_watch_items_delivers_exactly_the_changes_after_a_watermark(collector, features, engine, ids):
    upsert(collector, item(f"{ids}-1", "Argan Hair Oil"), item(f"{ids}-2", "Dry Shampoo"),
           item(f"{ids}-3", "Curl Cream"))
    watermark = caught_up(features, engine)
    # After the watermark: a title change, a price-only change, a new item, a deletion; an event
    # (statistics only) is not an item change.
    upsert(collector, item(f"{ids}-1", "Argan Hair Oil 100 ml"),
           item(f"{ids}-2", "Dry Shampoo", price=(7, 0)), item(f"{ids}-4", "Heat Protect Spray"))
    collector.DeleteItems(collector_pb2.DeleteItemsRequest(item_ids=[f"{ids}-3"]), timeout=10)
    ingest(collector, event(f"{ids}-e", "view", f"{ids}-u", f"{ids}-1"))
    target = caught_up(features, engine)

    changes, _ = watch_until(features, watermark, target, max_batch_size=2)
    mine = [c for c in changes if c.item.item_id.startswith(ids)]
    assert len(changes) == len(mine), "changes of items not changed after the watermark were sent"
    kinds = {c.item.item_id: c.kind for c in mine}
    upsert_kind, remove_kind = features_pb2.ITEM_CHANGE_KIND_UPSERT, features_pb2.ITEM_CHANGE_KIND_REMOVE
    assert kinds == {f"{ids}-1": upsert_kind, f"{ids}-2": upsert_kind, f"{ids}-4": upsert_kind,
                     f"{ids}-3": remove_kind}
    assert len(mine) == 4
    upserts = {c.item.item_id: c for c in mine if c.kind == features_pb2.ITEM_CHANGE_KIND_UPSERT}
    assert upserts[f"{ids}-1"].item.title == "Argan Hair Oil 100 ml"
    assert all(len(c.item.embedding.values) == 384 * 4 for c in upserts.values())
    assert all(watermark < c.lsn <= target for c in mine)

    # From the target on there is nothing; from 0, every listed item and no removal.
    assert watch_until(features, target, target)[0] == []
    everything, _ = watch_until(features, 0, target, max_batch_size=500)
    assert {c.kind for c in everything} == {features_pb2.ITEM_CHANGE_KIND_UPSERT}
    assert {f"{ids}-1", f"{ids}-2", f"{ids}-4"} <= {c.item.item_id for c in everything}
    assert f"{ids}-3" not in {c.item.item_id for c in everything}


def test_watch_items_streams_live_changes(collector, features, engine, ids):
    watermark = caught_up(features, engine)
    call = features.WatchItems(features_pb2.WatchItemsRequest(after_lsn=watermark), timeout=60)
    received: list = []
    done = threading.Event()

    def read():
        for response in call:
            received.extend(c.item.item_id for c in response.changes)
            if f"{ids}-live" in received:
                done.set()
                return
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    upsert(collector, item(f"{ids}-live", "Waterproof Eyeliner"))
    assert done.wait(60), received
    call.cancel()
    assert received == [f"{ids}-live"]


# ------------------------------------------------------------------------------ Resync, Status, etcd

def test_resync_re_embeds_given_items(collector, features, engine, ids):
    upsert(collector, item(f"{ids}-r", "Sheet Mask Set"))
    caught_up(features, engine)
    before = status(features)
    response = features.Resync(features_pb2.ResyncRequest(item_ids=[f"{ids}-r", f"{ids}-nope"]), timeout=60)
    assert (response.recomputed, response.re_embedded, list(response.not_found)) == (1, 1, [f"{ids}-nope"])
    assert status(features).embeddings_computed == before.embeddings_computed + 1
    # The resync is an item change for watchers.
    changes, _ = watch_until(features, before.applied_lsn, status(features).applied_lsn)
    assert [c.item.item_id for c in changes] == [f"{ids}-r"]


def test_status_and_the_watermark_in_etcd(features, engine, infra_env, etcd_prefix_module):
    applied = caught_up(features, engine)
    current = status(features)
    assert current.model_name == "sentence-transformers/all-MiniLM-L6-v2"
    assert current.connected and current.snapshot_done
    assert current.applied_lsn >= applied and current.items >= current.active_items > 0 and current.users > 0
    etcd = Etcd(infra_env.etcd_endpoint, etcd_prefix_module)
    try:
        published = wait_until(lambda: (lambda v: v if v and v["lsn"] >= applied else None)(
            etcd.get_json("data/watermark")), "the watermark in etcd")
    finally:
        etcd.close()
    assert published["consumer"] == "features" and isinstance(json.dumps(published), str)


# ------------------------------------------------------------------------------ RebuildUsers

def test_rebuild_users_reaches_a_ranker_user_cache_through_watch_users(collector, features, suite, engine, ids):
    """A replica's user cache holds drifted states; RebuildUsers rewrites one user's state and
    removes one with no events, and WatchUsers announces both, so the cache drops what it held."""
    user, ghost = f"{ids}-user", f"{ids}-ghost"
    ingest(collector, event(f"{ids}-1", "view", user, f"{ids}-a", when=T0),
           event(f"{ids}-2", "purchase", user, f"{ids}-b", when=T0 + timedelta(seconds=1)))
    caught_up(features, engine)
    # Drift written behind the stream's back (updated_lsn unchanged, so nothing is announced):
    # `ghost` gets a state without any event, `user` loses its latest history entry.
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO user_features (user_id, history, counters, recent_queries, updated_lsn, seen_items, "
            "seen_truncated) SELECT :g, history, counters, recent_queries, updated_lsn, seen_items, seen_truncated "
            "FROM user_features WHERE user_id = :u"), {"u": user, "g": ghost})
        connection.execute(sa.text(
            "UPDATE user_features SET history = history - (jsonb_array_length(history) - 1) WHERE user_id = :u"),
            {"u": user})
    client = FeaturesClient(suite[1].address, timeout_s=10)
    cache = UserCache(client, ttl_s=0.0)
    feed = UserFeed(client, cache).start()
    try:
        wait_until(feed.connected.is_set, "the ranker's user feed to connect", timeout_s=60)
        assert cache.get(user, 50, 0, 10).history.item_ids == (f"{ids}-a",)
        assert cache.get(ghost, 50, 0, 10).history.item_ids == (f"{ids}-a", f"{ids}-b")
        before = status(features).applied_lsn
        response = features.RebuildUsers(features_pb2.RebuildUsersRequest(user_ids=[user, ghost]), timeout=60)
        assert (response.rebuilt, response.removed, response.events) == (1, 1, 2)
        # The rewritten rows are stamped above the watermark they were written at, and the
        # watermark moves there: a change like any other for watchers.
        assert response.data_lsn > before and status(features).applied_lsn >= response.data_lsn
        wait_until(lambda: cache.stream_lsn >= response.data_lsn, "the user feed to pass the rebuild",
                   timeout_s=30)
        rebuilt = cache.get(user, 50, 0, 10).history
        assert rebuilt.item_ids == (f"{ids}-a", f"{ids}-b") and rebuilt.updated_lsn == response.data_lsn
        assert cache.get(ghost, 50, 0, 10).history.item_ids == ()
        assert cache.invalidations >= 2
        # A removed user reads as unknown; rebuilding it again changes nothing.
        gone = features.GetUserFeatures(features_pb2.GetUserFeaturesRequest(user_id=ghost), timeout=10)
        assert list(gone.features.history) == [] and dict(gone.features.counters) == {}
        again = features.RebuildUsers(features_pb2.RebuildUsersRequest(user_ids=[ghost]), timeout=60)
        assert (again.rebuilt, again.removed) == (0, 0)
    finally:
        feed.stop()
        client.close()
