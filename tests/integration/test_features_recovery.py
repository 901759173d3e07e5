"""Crash safety of the features service: `kill -9` in the middle of applying, restart, and the
feature store equals what the `events` and `items` tables say — no event lost, none counted twice.

Real processes throughout (collector with its replication slot, features, Postgres, etcd). Part
of the data exists before the features service first starts (it arrives as the initial
snapshot), the rest is written while it runs and while it is dead.
"""
from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from deltarec.v1 import collector_pb2, collector_pb2_grpc, common_pb2, features_pb2, features_pb2_grpc
from tests.support import channel_to, wait_until

pytestmark = pytest.mark.integration

T0 = datetime(2026, 2, 1, tzinfo=timezone.utc)
USERS = [f"ru{n}" for n in range(30)]
ITEMS = [f"ri{n}" for n in range(120)]
KINDS = ["view", "view", "view", "click", "add_to_cart", "purchase", "search"]
QUERIES = ["rose", "serum", "lip balm", "shampoo", "mascara", "spf 50", "night cream"]
HISTORY_LENGTH = 50
RECENT_QUERIES = 20


def insert_lsn(engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.text("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")).scalar())


def events_batch(rng: random.Random, start: int, count: int) -> list[common_pb2.Event]:
    batch = []
    for n in range(start, start + count):
        kind = rng.choice(KINDS)
        message = common_pb2.Event(event_id=f"rec-{n}", user_id=rng.choice(USERS),
                                   type=getattr(common_pb2, f"EVENT_TYPE_{kind.upper()}"))
        if kind == "search":
            message.query = rng.choice(QUERIES)
        else:
            message.item_id = rng.choice(ITEMS)
        # Distinct, increasing event times: the expected history order is unambiguous.
        message.timestamp.FromDatetime(T0 + timedelta(seconds=n))
        batch.append(message)
    return batch


def items_batch(rng: random.Random, round_: int, count: int) -> list[common_pb2.Item]:
    return [common_pb2.Item(item_id=item_id, title=f"{rng.choice(QUERIES).title()} no. {round_}-{item_id}",
                            category="Beauty", active=True,
                            price=common_pb2.Money(currency_code="EUR", units=rng.randint(1, 90)))
            for item_id in rng.sample(ITEMS, count)]


def expected_users(engine) -> dict[str, dict]:
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT user_id, event_type, item_id, query, occurred_at FROM events "
            "ORDER BY occurred_at, id")).all()
    users: dict[str, dict] = defaultdict(lambda: {"counters": Counter(), "history": [], "queries": []})
    for user_id, event_type, item_id, query, occurred_at in rows:
        user = users[user_id]
        user["counters"][event_type] += 1
        if event_type == "search":
            if query in user["queries"]:
                user["queries"].remove(query)
            user["queries"].append(query)
        else:
            user["history"].append((item_id, event_type, occurred_at))
    for user in users.values():
        user["history"] = user["history"][-HISTORY_LENGTH:]
        user["queries"] = user["queries"][-RECENT_QUERIES:]
    return users


def expected_item_counts(engine) -> dict[str, Counter]:
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT item_id, event_type, count(*) FROM events WHERE item_id IS NOT NULL "
            "GROUP BY item_id, event_type")).all()
    counts: dict[str, Counter] = defaultdict(Counter)
    for item_id, event_type, count in rows:
        counts[item_id][event_type] = count
    return counts


TYPE_NAMES = {common_pb2.EVENT_TYPE_VIEW: "view", common_pb2.EVENT_TYPE_CLICK: "click",
              common_pb2.EVENT_TYPE_ADD_TO_CART: "add_to_cart", common_pb2.EVENT_TYPE_PURCHASE: "purchase"}


def test_kill_9_mid_batch_and_restart_loses_and_duplicates_nothing(infra_env, database_url, etcd_prefix,
                                                                   start_service, engine):
    env = {"DATABASE_URL": database_url, "ETCD_ENDPOINT": infra_env.etcd_endpoint, "ETCD_PREFIX": etcd_prefix,
           "GRPC_PORT": "0", "METRICS_PORT": "0", "LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_S": "2",
           "COLLECTOR_HEARTBEAT_S": "0.5"}
    collector_process = start_service("services.collector", env)
    collector = collector_pb2_grpc.CollectorServiceStub(channel_to(collector_process))

    def write_round(round_: int, events: int, items: int) -> None:
        """Catalog changes, then events in several transactions. Rounds may run concurrently:
        each has its own random generator and event id range."""
        rng = random.Random(round_)
        request = collector_pb2.UpsertItemsRequest(items=items_batch(rng, round_, items))
        collector.UpsertItems(request, timeout=60)
        for start in range(0, events, 250):
            response = collector.IngestEvents(collector_pb2.IngestEventsRequest(
                events=events_batch(rng, round_ * 10_000 + start, 250)), timeout=60)
            assert response.accepted == 250

    # Before the features service exists: arrives as its initial snapshot.
    write_round(0, 1000, len(ITEMS))

    features_env = {**env, "COLLECTOR_ADDRESS": collector_process.address, "FEATURES_TORCH_THREADS": "1",
                    "FEATURES_DELTA_BATCH_SIZE": "200", "FEATURES_HISTORY_LENGTH": str(HISTORY_LENGTH)}
    first = start_service("services.features", features_env, name="features-1")
    features = features_pb2_grpc.FeaturesServiceStub(channel_to(first))

    def status():
        return features.Status(features_pb2.FeaturesServiceStatusRequest(), timeout=10)

    # While it runs: catalog changes (re-embeddings: slow batches) between event batches.
    writer_error: list[BaseException] = []

    def writer():
        try:
            for round_ in range(1, 9):
                write_round(round_, 500, 40)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            writer_error.append(error)
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()

    # Kill it while it is applying (after the snapshot and some streamed batches, before the
    # end), write while it is dead, restart; twice, at different points of the stream.
    process = first
    applied = wait_until(lambda: status().snapshot_done and status().applied_lsn,
                         "the snapshot to be applied")
    for attempt in (1, 2):
        wait_until(lambda: status().applied_lsn > applied, "streamed batches to be applied")
        process.kill()
        killed_at = insert_lsn(engine)
        write_round(8 + attempt, 250, 20)
        process = start_service("services.features", features_env, name=f"features-{attempt + 1}")
        features = features_pb2_grpc.FeaturesServiceStub(channel_to(process))
        applied = status().applied_lsn
        assert applied < insert_lsn(engine)
    thread.join(300)
    assert not thread.is_alive() and not writer_error, writer_error
    target = insert_lsn(engine)
    assert target > killed_at
    wait_until(lambda: status().applied_lsn >= target, f"features to catch up to {target}")

    # Every user as the events table says.
    expected = expected_users(engine)
    assert len(expected) == len(USERS)
    total = 0
    for user_id, want in expected.items():
        request = features_pb2.GetUserFeaturesRequest(user_id=user_id)
        got = features.GetUserFeatures(request, timeout=10).features
        assert dict(got.counters) == dict(want["counters"]), user_id
        history = [(h.item_id, TYPE_NAMES[h.type], h.timestamp.ToDatetime(tzinfo=timezone.utc))
                   for h in got.history]
        assert history == want["history"], user_id
        assert list(got.recent_queries) == want["queries"], user_id
        total += sum(got.counters.values())
    with engine.connect() as connection:
        assert total == connection.execute(sa.text("SELECT count(*) FROM events")).scalar()

    # Every item's statistics and vector as the tables say.
    counts = expected_item_counts(engine)
    request = features_pb2.GetItemFeaturesRequest(item_ids=ITEMS, include_embedding=True)
    response = features.GetItemFeatures(request, timeout=30)
    assert list(response.not_found) == []
    with engine.connect() as connection:
        titles = dict(connection.execute(sa.text("SELECT item_id, title FROM items")).all())
    for item in response.items:
        want = counts[item.item_id]
        assert (item.stats.views, item.stats.clicks, item.stats.add_to_carts, item.stats.purchases) == \
            (want["view"], want["click"], want["add_to_cart"], want["purchase"]), item.item_id
        assert item.title == titles[item.item_id] and len(item.embedding.values) == 384 * 4


def test_events_apply_while_the_text_model_cannot_load_and_items_wait_for_it(
        infra_env, database_url, etcd_prefix, start_service, engine, tmp_path):
    """A features service whose text model is not there (DELTAREC_MINILM_PATH names a directory
    that does not exist yet: every load fails and is retried) is SERVING, applies events and
    answers reads; EmbedText is UNAVAILABLE; an item change (text to embed) waits for the model
    with everything after it in the stream — the order is kept. Once the model appears it loads,
    the item gets its vector and the events behind it follow."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    import grpc
    from services.common.text_encoder import locate_minilm_dir

    env = {"DATABASE_URL": database_url, "ETCD_ENDPOINT": infra_env.etcd_endpoint, "ETCD_PREFIX": etcd_prefix,
           "GRPC_PORT": "0", "METRICS_PORT": "0", "LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_S": "2",
           "COLLECTOR_HEARTBEAT_S": "0.5"}
    collector_process = start_service("services.collector", env)
    collector = collector_pb2_grpc.CollectorServiceStub(channel_to(collector_process))
    model_dir = tmp_path / "minilm"
    process = start_service("services.features", {
        **env, "COLLECTOR_ADDRESS": collector_process.address, "FEATURES_TORCH_THREADS": "1",
        "DELTAREC_MINILM_PATH": str(model_dir), "FEATURES_TEXT_MODEL_RETRY_S": "0.5"})
    channel = channel_to(process)
    features = features_pb2_grpc.FeaturesServiceStub(channel)

    def status():
        return features.Status(features_pb2.FeaturesServiceStatusRequest(), timeout=10)

    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert not status().text_model_ready
    wait_until(lambda: status().text_model_state.startswith("failed: FileNotFoundError"), "the load to fail")

    def user_events(user: str, item: str, n: int):
        return collector_pb2.IngestEventsRequest(events=[common_pb2.Event(
            event_id=f"nomodel-{user}-{n}", user_id=user, item_id=item, type=common_pb2.EVENT_TYPE_PURCHASE)])

    def counters(user: str) -> dict:
        got = features.GetUserFeatures(features_pb2.GetUserFeaturesRequest(user_id=user), timeout=10)
        return dict(got.features.counters)

    # Events need no model: applied and readable.
    ingested = collector.IngestEvents(user_events("nm-user", "nm-item", 1), timeout=30)
    wait_until(lambda: status().applied_lsn >= ingested.commit_lsn, "the event to be applied")
    assert counters("nm-user") == {"purchase": 1}
    with pytest.raises(grpc.RpcError) as refused:
        features.EmbedText(features_pb2.EmbedTextRequest(texts=["rose lip balm"]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "text model" in refused.value.details()

    # An item to embed, then an event: both wait (one stream, in commit order, nothing acked).
    upsert = collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=[common_pb2.Item(
        item_id="nm-new-item", title="Rose Lip Balm", category="Beauty", active=True)]), timeout=30)
    behind = collector.IngestEvents(user_events("nm-user", "nm-item", 2), timeout=30)
    assert behind.commit_lsn > upsert.commit_lsn
    time.sleep(3.0)            # the collector sends within milliseconds (heartbeat 0.5 s)
    held = status()
    assert held.applied_lsn < upsert.commit_lsn and counters("nm-user") == {"purchase": 1}

    # The model appears (atomically: a staged directory renamed into place) and loads.
    staging = tmp_path / "minilm-staging"
    staging.mkdir()
    for source in locate_minilm_dir().iterdir():
        (staging / source.name).symlink_to(source)
    staging.rename(model_dir)
    wait_until(lambda: status().text_model_ready, "the text model to load", timeout_s=300)
    wait_until(lambda: status().applied_lsn >= behind.commit_lsn, "the held batches to be applied")
    assert counters("nm-user") == {"purchase": 2}
    item = features.GetItemFeatures(features_pb2.GetItemFeaturesRequest(
        item_ids=["nm-new-item"], include_embedding=True), timeout=10).items[0]
    assert len(item.embedding.values) == 384 * 4 and not item.fallback_embedding
    assert status().text_model_state == "ready" and status().text_model_load_seconds > 0
    embedded = features.EmbedText(features_pb2.EmbedTextRequest(texts=["rose lip balm"]), timeout=30)
    assert len(embedded.vectors) == 1
    channel.close()
