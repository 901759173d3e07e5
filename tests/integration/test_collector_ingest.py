"""The collector's ingest API against the real collector process and the real Postgres.

One collector process serves the whole module (its own database); every test uses event and
item ids of its own, so tests do not see each other's rows.
"""
from __future__ import annotations

import random
import threading
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import grpc
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from deltarec.v1 import collector_pb2, collector_pb2_grpc, common_pb2
from scripts.launch import ServiceProcess
from tests.support import channel_to, count_events

pytestmark = pytest.mark.integration

MAX_BATCH = 300
ACCEPTED = collector_pb2.EVENT_STATUS_ACCEPTED
DUPLICATE = collector_pb2.EVENT_STATUS_DUPLICATE
REJECTED = collector_pb2.EVENT_STATUS_REJECTED
T0 = datetime(2024, 3, 1, 9, 30, 0, 123456, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def collector(infra_env, database_url, tmp_path_factory):
    env = {"DATABASE_URL": database_url, "ETCD_ENDPOINT": infra_env.etcd_endpoint,
           "ETCD_PREFIX": f"/test-{uuid.uuid4().hex[:10]}/", "GRPC_PORT": "0", "METRICS_PORT": "0",
           "LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_S": "5", "COLLECTOR_MAX_BATCH": str(MAX_BATCH)}
    process = ServiceProcess("services.collector", env, log_dir=tmp_path_factory.mktemp("logs")).start()
    yield process
    process.stop(timeout_s=15)


@pytest.fixture(scope="module")
def stub(collector):
    channel = channel_to(collector)
    yield collector_pb2_grpc.CollectorServiceStub(channel)
    channel.close()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}-"


def event(event_id: str, kind: str = "view", user: str = "u-1", item: str | None = "B00ROSE",
          query: str = "", when: datetime | None = T0, **attributes) -> common_pb2.Event:
    message = common_pb2.Event(event_id=event_id, type=getattr(common_pb2, f"EVENT_TYPE_{kind.upper()}"),
                               user_id=user, item_id=item or "", query=query, attributes=attributes)
    if when is not None:
        message.timestamp.FromDatetime(when)
    return message


def ingest(stub, events) -> collector_pb2.IngestEventsResponse:
    return stub.IngestEvents(collector_pb2.IngestEventsRequest(events=events), timeout=60)


def stored_events(engine, prefix: str) -> dict[str, dict]:
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT event_id, event_type, user_id, item_id, query, occurred_at, attributes "
            "FROM events WHERE event_id LIKE :p"), {"p": prefix + "%"}).mappings().all()
    return {row["event_id"]: dict(row) for row in rows}


def statuses(response) -> list[int]:
    return [result.status for result in response.results]


def invalid_argument(call, *args) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    return info.value.details()


# ------------------------------------------------------------------------------ IngestEvents

def test_each_event_is_reported_in_order_and_exactly_the_accepted_ones_are_stored(stub, engine, prefix):
    p = prefix
    bad_time = event(p + "7")
    bad_time.timestamp.seconds = 10 ** 12            # beyond year 9999
    batch = [
        event(p + "0", "view", user="u-ana", item="B00ROSE", page="pdp", position="3"),
        event(p + "1", "click", user=""),                                    # no user
        event(p + "2", "search", user="u-ana", item=None, query="rose water toner"),
        event(p + "0", "purchase", user="u-bob", item="B00OTHER"),           # same id again
        event(p + "4", "purchase", query="toner"),                           # query on a purchase
        event(p + "5", "add_to_cart", user="u-ana", item="B00SERUM", when=None),
        event(p + "6\x00", "view"),                                          # NUL in the id
        bad_time,
        event(p + "8", "view", when=datetime(1999, 12, 31, tzinfo=timezone.utc)),
        event(p + "9", "view", when=datetime.now(timezone.utc) + timedelta(days=2)),
    ]
    before = datetime.now(timezone.utc)
    response = ingest(stub, batch)
    after = datetime.now(timezone.utc)

    assert [r.index for r in response.results] == list(range(len(batch)))
    assert [r.event_id for r in response.results] == [e.event_id for e in batch]
    assert statuses(response) == [ACCEPTED, REJECTED, ACCEPTED, DUPLICATE, REJECTED, ACCEPTED,
                                  REJECTED, REJECTED, REJECTED, REJECTED]
    reasons = [r.reason for r in response.results]
    assert reasons[1] == "user_id: required"
    assert reasons[4] == "query: only allowed for EVENT_TYPE_SEARCH, not EVENT_TYPE_PURCHASE"
    assert reasons[6] == "event_id: contains a NUL character"
    assert reasons[7] == "timestamp: out of range"
    assert reasons[8].startswith("timestamp:") and "before 2000" in reasons[8]
    assert reasons[9].startswith("timestamp:") and "future" in reasons[9]
    assert reasons[0] == reasons[2] == reasons[5] == ""
    assert (response.accepted, response.duplicates, response.rejected) == (3, 1, 6)

    stored = stored_events(engine, p)
    assert set(stored) == {p + "0", p + "2", p + "5"}
    # The first occurrence of a duplicated id is the one stored.
    assert stored[p + "0"] == {"event_id": p + "0", "event_type": "view", "user_id": "u-ana",
                               "item_id": "B00ROSE", "query": None, "occurred_at": T0,
                               "attributes": {"page": "pdp", "position": "3"}}
    assert (stored[p + "2"]["event_type"], stored[p + "2"]["item_id"], stored[p + "2"]["query"]) == \
        ("search", None, "rose water toner")
    # No timestamp: the collector's clock at the time of the call.
    assert before - timedelta(seconds=1) <= stored[p + "5"]["occurred_at"] <= after + timedelta(seconds=1)

    with engine.connect() as connection:
        rejected = connection.execute(sa.text(
            "SELECT event_id, payload, reason FROM rejected_events WHERE event_id LIKE :p ORDER BY id"),
            {"p": p + "%"}).mappings().all()
    assert [row["reason"] for row in rejected] == [reasons[i] for i in (1, 4, 6, 7, 8, 9)]
    assert rejected[0]["event_id"] == p + "1"
    assert rejected[0]["payload"]["type"] == "EVENT_TYPE_CLICK"
    assert rejected[0]["payload"]["item_id"] == "B00ROSE"
    assert rejected[1]["payload"]["query"] == "toner"
    # Unstorable characters are replaced, not allowed to fail the batch.
    assert rejected[2]["event_id"] == p + "6\ufffd"
    assert rejected[3]["payload"]["timestamp"] == {"seconds": 10 ** 12, "nanos": 123456000}


NASTY = ['quote"inside', "back\\slash", "ends with backslash\\", '\\"', "{braces}", "a,b", "NULL", "null",
         " padded ", "new\nline", "tab\tbed", "'single'", "$$dollar$$", "ü—漢字🙂", "%(events)s", "{\"a\": 1}"]


def _as_id(text: str) -> str:
    """Ids refuse control characters (services/common/validation.py); free text keeps them."""
    return text.replace("\n", " ").replace("\t", " ")


def test_any_text_round_trips_exactly(stub, engine, prefix):
    batch = []
    for i, text in enumerate(NASTY):
        ident = _as_id(text)
        batch.append(event(f"{prefix}{i}{ident}", user=ident, item=ident, note=text, **{ident: "key"}))
        batch.append(event(f"{prefix}{i}s{ident}", "search", user=ident, item=None, query=text))
    response = ingest(stub, batch)
    assert response.accepted == len(batch), [r.reason for r in response.results if r.reason]
    stored = stored_events(engine, prefix)
    for i, text in enumerate(NASTY):
        ident = _as_id(text)
        row = stored[f"{prefix}{i}{ident}"]
        assert (row["user_id"], row["item_id"], row["attributes"]) == (ident, ident, {"note": text, ident: "key"})
        assert stored[f"{prefix}{i}s{ident}"]["query"] == text


def test_an_id_with_a_control_character_is_rejected_naming_the_field(stub, engine, prefix):
    response = ingest(stub, [event(f"{prefix}ok", user="new\nline"), event(f"{prefix}tab\tbed")])
    assert response.accepted == 0
    reasons = [r.reason for r in response.results]
    assert reasons[0].startswith("user_id: contains a control character (U+000A)"), reasons
    assert reasons[1].startswith("event_id: contains a control character (U+0009)"), reasons
    assert stored_events(engine, prefix) == {}


def _text(max_chars: int):
    return st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   min_size=1, max_size=max_chars).filter(lambda s: s.strip())


def _id(max_chars: int):
    """Ids: any character but control characters (and surrogates), at most 4 bytes each."""
    return st.text(st.characters(blacklist_categories=("Cs", "Cc")),
                   min_size=1, max_size=max_chars).filter(lambda s: s.strip())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(_id(32), _id(32), _text(200), st.dictionaries(_id(16), _text(200), max_size=3)),
                min_size=1, max_size=20))
def test_generated_events_round_trip_exactly(stub, engine, fields):
    prefix = f"h{uuid.uuid4().hex[:10]}-"
    batch = [event(f"{prefix}{i}", user=user, item=item, query="", when=T0 + timedelta(microseconds=i), **attrs)
             if i % 2 else
             event(f"{prefix}{i}", "search", user=user, item=None, query=query, when=T0, **attrs)
             for i, (user, item, query, attrs) in enumerate(fields)]
    response = ingest(stub, batch)
    assert response.accepted == len(batch), [r.reason for r in response.results if r.reason]
    stored = stored_events(engine, prefix)
    for i, (user, item, query, attrs) in enumerate(fields):
        row = stored[f"{prefix}{i}"]
        assert row["user_id"] == user and row["attributes"] == attrs
        assert (row["item_id"], row["query"]) == ((item, None) if i % 2 else (None, query))
        assert row["occurred_at"] == (T0 + timedelta(microseconds=i) if i % 2 else T0)


def test_a_retried_batch_reports_the_stored_events_as_duplicates(stub, engine, prefix):
    first = [event(prefix + str(i), user=f"u-{i}") for i in range(3)]
    assert statuses(ingest(stub, first)) == [ACCEPTED] * 3
    retry = first + [event(prefix + "new")]
    response = ingest(stub, retry)
    assert statuses(response) == [DUPLICATE, DUPLICATE, DUPLICATE, ACCEPTED]
    assert response.results[0].reason == "event_id already stored"
    assert (response.accepted, response.duplicates) == (1, 3)
    assert count_events(engine, prefix) == 4


def test_a_duplicate_inside_one_batch_is_stored_once(stub, engine, prefix):
    response = ingest(stub, [event(prefix + "a"), event(prefix + "b"), event(prefix + "a", "click"),
                             event(prefix + "a", "purchase")])
    assert statuses(response) == [ACCEPTED, ACCEPTED, DUPLICATE, DUPLICATE]
    assert stored_events(engine, prefix)[prefix + "a"]["event_type"] == "view"
    assert count_events(engine, prefix) == 2


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_duplicate_batches_store_each_event_exactly_once(stub, engine, prefix, round_):
    threads, size = 8, 200
    events = [event(f"{prefix}{i:03d}", user=f"u-{i % 17}", item=f"B{i % 23:05d}",
                    when=T0 + timedelta(seconds=i)) for i in range(size)]
    # Each client sends the same events in its own order: overlapping batches in different
    # orders must neither deadlock nor store anything twice.
    orders = [random.Random(seed + 100 * round_).sample(events, len(events)) for seed in range(threads)]
    barrier = threading.Barrier(threads)
    responses: list = [None] * threads
    errors: list = []

    def send(slot: int) -> None:
        try:
            barrier.wait(timeout=30)
            responses[slot] = ingest(stub, orders[slot])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=send, args=(slot,)) for slot in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not errors, errors

    assert sum(r.accepted for r in responses) == size
    assert sum(r.duplicates for r in responses) == size * (threads - 1)
    assert all(r.rejected == 0 for r in responses)
    accepted_by: dict[str, int] = {}
    for response in responses:
        for result in response.results:
            assert result.status in (ACCEPTED, DUPLICATE)
            if result.status == ACCEPTED:
                accepted_by[result.event_id] = accepted_by.get(result.event_id, 0) + 1
    assert accepted_by == {e.event_id: 1 for e in events}
    assert count_events(engine, prefix) == size


def test_events_about_items_not_in_the_catalog_are_accepted_and_counted(stub, engine, prefix):
    known = prefix + "known"
    upserted = stub.UpsertItems(collector_pb2.UpsertItemsRequest(items=[
        common_pb2.Item(item_id=known, title="Argan Oil Hair Mask, 200 ml", active=True)]), timeout=30)
    assert upserted.upserted == 1
    batch = [event(prefix + "1", item=known), event(prefix + "2", item=prefix + "ghost"),
             event(prefix + "3", "click", item=prefix + "ghost"),
             event(prefix + "4", "search", item=None, query="argan"),
             event(prefix + "5", "purchase", item=prefix + "other-ghost")]
    response = ingest(stub, batch)
    assert (response.accepted, response.unknown_items) == (5, 3)
    assert count_events(engine, prefix) == 5
    # Duplicates are not accepted again, so not counted again.
    assert ingest(stub, batch).unknown_items == 0


def test_a_batch_at_the_limit_is_accepted(stub, engine, prefix):
    response = ingest(stub, [event(f"{prefix}{i}") for i in range(MAX_BATCH)])
    assert response.accepted == MAX_BATCH
    assert count_events(engine, prefix) == MAX_BATCH


def test_too_many_events_is_invalid_argument_naming_events_and_stores_nothing(stub, engine, prefix):
    request = collector_pb2.IngestEventsRequest(events=[event(f"{prefix}{i}") for i in range(MAX_BATCH + 1)])
    details = invalid_argument(stub.IngestEvents, request)
    assert details.startswith("events:") and str(MAX_BATCH) in details
    assert count_events(engine, prefix) == 0


def test_an_empty_request_is_invalid_argument(stub):
    assert invalid_argument(stub.IngestEvents, collector_pb2.IngestEventsRequest()) == \
        "events: must not be empty"


# ------------------------------------------------------------------------------ StreamEvents

def stream(stub, batches):
    requests = (collector_pb2.StreamEventsRequest(events=batch) for batch in batches)
    return stub.StreamEvents(requests, timeout=60)


def test_stream_events_has_the_same_semantics_across_several_batches(stub, engine, prefix):
    p = prefix
    batches = [
        [event(p + "0"), event(p + "1"), event(p + "2", "search", item=None)],     # 2: no query
        [event(p + "1", "click"), event(p + "3"), event(p + "3", "purchase")],     # dup across, dup in
        [event(p + "4", "search", item=None, query="matte lipstick")],
        [event(f"{p}bulk{i}", user=f"u-{i % 5}") for i in range(150)],
    ]
    response = stream(stub, batches)
    assert response.batches == 4
    assert (response.accepted, response.duplicates, response.rejected) == (154, 2, 1)
    assert response.unknown_items == 153          # all but the search
    not_accepted = [(b, r.index, r.event_id, r.status)
                    for b, r in zip(response.batch_indexes, response.not_accepted)]
    assert not_accepted == [(0, 2, p + "2", REJECTED), (1, 0, p + "1", DUPLICATE), (1, 2, p + "3", DUPLICATE)]
    assert response.not_accepted[0].reason == "query: required"
    stored = stored_events(engine, p)
    assert len(stored) == 154 and p + "2" not in stored
    assert stored[p + "1"]["event_type"] == "view" and stored[p + "3"]["event_type"] == "view"
    # Replaying the whole stream: everything valid is now a duplicate.
    again = stream(stub, batches)
    assert (again.accepted, again.duplicates, again.rejected) == (0, 156, 1)


def test_a_bad_batch_fails_the_stream_but_earlier_batches_stay_committed(stub, engine, prefix):
    batches = [[event(prefix + "0"), event(prefix + "1")], [],
               [event(prefix + "2")]]
    with pytest.raises(grpc.RpcError) as info:
        stream(stub, batches)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "events: must not be empty"
    assert set(stored_events(engine, prefix)) == {prefix + "0", prefix + "1"}


def test_a_stream_batch_over_the_limit_is_invalid_argument_naming_events(stub, engine, prefix):
    with pytest.raises(grpc.RpcError) as info:
        stream(stub, [[event(f"{prefix}{i}") for i in range(MAX_BATCH + 1)]])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("events:")
    assert count_events(engine, prefix) == 0


# ------------------------------------------------------------------------------ catalog

def item(item_id: str, title: str = "Vitamin C Brightening Serum, 30 ml", **fields) -> common_pb2.Item:
    return common_pb2.Item(item_id=item_id, title=title, **fields)


def stored_items(engine, prefix: str) -> dict[str, dict]:
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT item_id, title, description, category, brand, price, currency, attributes, active "
            "FROM items WHERE item_id LIKE :p"), {"p": prefix + "%"}).mappings().all()
    return {row["item_id"]: dict(row) for row in rows}


def upsert(stub, items) -> collector_pb2.UpsertItemsResponse:
    return stub.UpsertItems(collector_pb2.UpsertItemsRequest(items=items), timeout=30)


def test_upsert_items_validates_each_item(stub, engine, prefix):
    p = prefix
    response = upsert(stub, [
        item(p + "a"),
        item(p + "b", price=common_pb2.Money(currency_code="eur", units=5)),
        item(p + "c", title="t" * 1025),
        item(p + "d", brand="x" * 257),
        item(p + "e", price=common_pb2.Money(currency_code="EUR", units=-1)),
        item(p + "f", title="Charcoal Detox Face Mask"),
    ])
    assert [(r.index, r.item_id, r.ok) for r in response.results] == [
        (0, p + "a", True), (1, p + "b", False), (2, p + "c", False), (3, p + "d", False),
        (4, p + "e", False), (5, p + "f", True)]
    assert response.results[1].reason.startswith("price.currency_code:")
    assert response.results[2].reason == "title: 1025 bytes, more than 1024"
    assert response.results[3].reason == "brand: 257 bytes, more than 256"
    assert response.results[4].reason == "price: must not be negative"
    assert (response.upserted, response.rejected) == (2, 4)
    assert set(stored_items(engine, p)) == {p + "a", p + "f"}


def test_upsert_replaces_every_field(stub, engine, prefix):
    item_id = prefix + "serum"
    upsert(stub, [item(item_id, description="With ferulic acid.", category="Beauty > Skin Care",
                       brand="Lumen Lab", price=common_pb2.Money(currency_code="USD", units=24, nanos=500_000_000),
                       attributes={"size": "30 ml", "scent": "citrus"}, active=True)])
    first = stored_items(engine, prefix)[item_id]
    assert first == {"item_id": item_id, "title": "Vitamin C Brightening Serum, 30 ml",
                     "description": "With ferulic acid.", "category": "Beauty > Skin Care",
                     "brand": "Lumen Lab", "price": Decimal("24.5"), "currency": "USD",
                     "attributes": {"size": "30 ml", "scent": "citrus"}, "active": True}
    # Second version: fields left out are cleared, not kept from the first.
    upsert(stub, [item(item_id, title="Vitamin C Serum (reformulated)", attributes={"size": "15 ml"},
                       active=False)])
    assert stored_items(engine, prefix)[item_id] == {
        "item_id": item_id, "title": "Vitamin C Serum (reformulated)", "description": "", "category": "",
        "brand": "", "price": None, "currency": None, "attributes": {"size": "15 ml"}, "active": False}


def test_the_last_version_of_an_item_in_a_batch_wins(stub, engine, prefix):
    item_id = prefix + "mask"
    response = upsert(stub, [item(item_id, title="Clay Mask v1", brand="A"), item(prefix + "other"),
                             item(item_id, title="Clay Mask v2", brand="B"),
                             item(item_id, title="t" * 1025, brand="C")])  # invalid: ignored
    assert [r.ok for r in response.results] == [True, True, True, False]
    assert response.upserted == 2
    row = stored_items(engine, prefix)[item_id]
    assert (row["title"], row["brand"]) == ("Clay Mask v2", "B")


@pytest.mark.parametrize("units,nanos,expected", [
    (12_345_678, 123_456_789, "12345678.123456789"), (0, 100_000_000, "0.1"), (19, 990_000_000, "19.99"),
    (999_999_999, 999_999_999, "999999999.999999999"), (0, 1, "0.000000001"), (0, 0, "0")])
def test_prices_are_stored_exactly(stub, engine, prefix, units, nanos, expected):
    item_id = prefix + "priced"
    upsert(stub, [item(item_id, price=common_pb2.Money(currency_code="JPY", units=units, nanos=nanos))])
    with engine.connect() as connection:
        price, text = connection.execute(sa.text(
            "SELECT price, price::text FROM items WHERE item_id = :id"), {"id": item_id}).one()
    assert price == Decimal(expected)
    assert Decimal(text) == Decimal(expected)


def test_too_many_or_no_items_is_invalid_argument_naming_items(stub, engine, prefix):
    details = invalid_argument(stub.UpsertItems, collector_pb2.UpsertItemsRequest(
        items=[item(f"{prefix}{i}") for i in range(MAX_BATCH + 1)]))
    assert details.startswith("items:")
    assert stored_items(engine, prefix) == {}
    assert invalid_argument(stub.UpsertItems, collector_pb2.UpsertItemsRequest()) == "items: must not be empty"


def test_delete_items_really_deletes_and_reports_what_was_not_found(stub, engine, prefix):
    upsert(stub, [item(prefix + "x"), item(prefix + "y"), item(prefix + "keep")])
    response = stub.DeleteItems(collector_pb2.DeleteItemsRequest(
        item_ids=[prefix + "x", prefix + "missing", prefix + "y"]), timeout=30)
    assert response.deleted == 2
    assert list(response.not_found) == [prefix + "missing"]
    assert set(stored_items(engine, prefix)) == {prefix + "keep"}
    with engine.connect() as connection:   # a real DELETE, not a soft one
        assert connection.execute(sa.text("SELECT count(*) FROM items WHERE item_id IN (:x, :y)"),
                                  {"x": prefix + "x", "y": prefix + "y"}).scalar_one() == 0
    again = stub.DeleteItems(collector_pb2.DeleteItemsRequest(item_ids=[prefix + "x"]), timeout=30)
    assert (again.deleted, list(again.not_found)) == (0, [prefix + "x"])


def test_delete_items_request_shape(stub, prefix):
    assert invalid_argument(stub.DeleteItems, collector_pb2.DeleteItemsRequest()) == "item_ids: must not be empty"
    assert invalid_argument(stub.DeleteItems, collector_pb2.DeleteItemsRequest(
        item_ids=[prefix + "a", ""])).startswith("item_ids[1]:")
    assert invalid_argument(stub.DeleteItems, collector_pb2.DeleteItemsRequest(
        item_ids=[f"{prefix}{i}" for i in range(MAX_BATCH + 1)])).startswith("item_ids:")
