"""Recommend, Search, SimilarItems, filters, read-your-writes and admission on the plain core."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.contracts.model_pointer import ModelPointer
from services.ranker.admission import AdmissionControl
from services.ranker.catalog import Catalog, ItemUpdate
from services.ranker.filters import FilterSpec
from services.ranker.index_structures import IndexOptions
from services.ranker.model_bundle import ModelBundle
from services.ranker.query_encoder import CachedEncoder
from services.ranker.recommend import Recommender
from services.ranker.request_path import RequestPath
from services.ranker.routing import ServingState
from services.ranker.search import Searcher
from services.ranker.user_cache import FeaturesUnavailable, UserCache, UserHistory
from tests import fakes

torch.set_num_threads(1)

N = 400
ITEMS = [f"i{n}" for n in range(N)]
TITLES = [f"{['Rose', 'Mint', 'Amber', 'Cedar'][n % 4]} {['Lip Balm', 'Face Cream', 'Hair Oil'][n % 3]} No {n}"
          for n in range(N)]
PURCHASE, VIEW = 4, 1


class Histories:
    """An in-memory stand-in for the features service's user histories."""

    def __init__(self):
        self.users: dict[str, UserHistory] = {}
        self.calls = 0
        self.down = False

    def user_history(self, user_id, max_history, timeout_s):
        self.calls += 1
        if self.down:
            raise FeaturesUnavailable("down")
        return self.users.get(user_id, UserHistory(data_lsn=1000))

    def add(self, user_id, items, events, lsn=1000):
        now = time.time()
        self.users[user_id] = UserHistory(tuple(items), tuple(events),
                                          tuple(now - 60.0 * (len(items) - i) for i in range(len(items))), lsn)


class HashEncoder:
    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        return fakes.text_vectors(texts)


@pytest.fixture
def world():
    catalog = Catalog(IndexOptions(kind="flat"))
    text = fakes.text_vectors(TITLES)
    catalog.apply([ItemUpdate(ITEMS[n], 10 + n, title=TITLES[n], brand=["Belle Rose", "Nordic Glow"][n % 2],
                              category=["Beauty > Lips", "Beauty > Skin", "Beauty > Hair"][n % 3],
                              price=float(n % 50), vector=text[n], popularity=float(n % 7))
                   for n in range(N)], watermark=1000)
    state = ServingState()
    artifact = fakes.make_artifact(1, ITEMS[:350], text[:350], popular=ITEMS[100:120])
    bundle = ModelBundle(artifact, ModelPointer(1, "file:///m", "a" * 64), artifact.build_model(), catalog)
    bundle.build_index()
    state.install(bundle, None, 0.0)
    histories = Histories()
    users = UserCache(histories, ttl_s=60.0)
    encoder = HashEncoder()
    admission = AdmissionControl(max_running=1, max_waiting=0)
    path = RequestPath(catalog, users, admission, max_wait_s=5.0)
    return {"catalog": catalog, "state": state, "histories": histories, "users": users, "encoder": encoder,
            "admission": admission, "recommender": Recommender(catalog, state, path),
            "searcher": Searcher(catalog, state, path, CachedEncoder(encoder))}


def test_recommend_personal_with_reasons_and_purchases_excluded(world):
    world["histories"].add("u1", ["i1", "i2", "i3"], [VIEW, PURCHASE, VIEW])
    answer = world["recommender"].recommend("u1", 10)
    ids = [item.item_id for item in answer.items]
    assert len(ids) == 10 and not answer.cold_start
    assert "i2" not in ids                               # bought: excluded by default
    assert answer.model_version == 1 and answer.variant == "current" and answer.data_lsn == 1000
    # the last place: a new item (i350 and up have no learned id), named so (test_the_last_place_...)
    assert all(item.reason.startswith("because you") for item in answer.items[:9])
    assert answer.items[9].reason.startswith(("because you", "new in the catalog, like "))
    assert any(t in answer.items[0].reason for t in TITLES[1:4])
    assert [item.score for item in answer.items] == sorted((item.score for item in answer.items), reverse=True)
    seen = world["recommender"].recommend("u1", 10, FilterSpec(exclude_seen=True))
    assert not {"i1", "i2", "i3"} & {item.item_id for item in seen.items}


def test_recommend_filters(world):
    world["histories"].add("u1", ["i1", "i5"], [VIEW, VIEW])
    catalog = world["catalog"]
    answer = world["recommender"].recommend(
        "u1", 20, FilterSpec(categories=("Beauty > Hair",), min_price=10, max_price=20, exclude_item_ids=("i14",)))
    assert answer.items
    for item in answer.items:
        meta = catalog.meta_of(item.item_id)
        assert meta.category == "Beauty > Hair" and 10 <= meta.price <= 20 and item.item_id != "i14"
    # a price filter without category goes through the over-fetching path
    cheap = world["recommender"].recommend("u1", 15, FilterSpec(max_price=3))
    assert cheap.items and all(catalog.meta_of(i.item_id).price <= 3 for i in cheap.items)


def test_unknown_user_gets_popular_and_fresh_items(world):
    answer = world["recommender"].recommend("never-seen", 10)
    assert answer.cold_start and len(answer.items) == 10
    reasons = {item.reason for item in answer.items}
    assert reasons == {"popular right now", "new in the catalog"}
    # without any model the same path answers (model_version 0)
    world["state"].install(None, None, 0.0)
    bare = world["recommender"].recommend("u-x", 5)
    assert bare.model_version == 0 and len(bare.items) == 5


def test_deleted_item_is_never_recommended(world):
    catalog, recommender = world["catalog"], world["recommender"]
    world["histories"].add("u1", ["i1"], [VIEW])
    top = recommender.recommend("u1", 5).items[0].item_id
    catalog.apply([ItemUpdate(top, 2000, remove=True)], watermark=2000)
    for user in ("u1", "someone-new"):
        assert top not in {i.item_id for i in recommender.recommend(user, 200).items}
    assert top not in {i.item_id for i in recommender.similar("i1", 200).items}
    assert top not in {i.item_id for i in world["searcher"].search(catalog.meta_of(top).title, k=50).items}


def test_min_data_lsn_waits_then_answers_or_fails_with_watermark(world):
    catalog, recommender = world["catalog"], world["recommender"]
    with pytest.raises(FailedPrecondition) as failure:
        recommender.recommend("u1", 5, min_data_lsn=5000, timeout_s=0.05)
    assert failure.value.watermark == 1000 and "1000" in str(failure.value)
    world["histories"].add("u1", ["i1"], [VIEW], lsn=5000)
    timer = threading.Timer(0.05, lambda: catalog.apply([], watermark=5000))
    timer.start()
    answer = recommender.recommend("u1", 5, min_data_lsn=5000, timeout_s=30)
    timer.join()
    assert answer.data_lsn >= 5000


def test_user_cache_reads_through_for_newer_min_lsn(world):
    histories, recommender = world["histories"], world["recommender"]
    histories.add("u1", ["i1"], [VIEW], lsn=1000)
    recommender.recommend("u1", 5)
    recommender.recommend("u1", 5)
    assert histories.calls == 1                      # second one served from the cache
    histories.add("u1", ["i1", "i7"], [VIEW, PURCHASE], lsn=1500)
    world["catalog"].apply([], watermark=1500)
    answer = recommender.recommend("u1", 200, min_data_lsn=1500, timeout_s=5)
    assert histories.calls == 2 and "i7" not in {i.item_id for i in answer.items}


def test_features_down_degrades_to_cold_start_unless_read_your_writes(world):
    world["histories"].down = True
    answer = world["recommender"].recommend("u1", 5)
    assert answer.cold_start and answer.items
    with pytest.raises(Exception) as failure:
        world["recommender"].recommend("u2", 5, min_data_lsn=10, timeout_s=1)
    assert "unavailable" in str(failure.value)


def test_search_exact_title_brand_and_personalisation(world):
    searcher, catalog = world["searcher"], world["catalog"]
    answer = searcher.search(TITLES[123], k=5)
    assert answer.items[0].item_id == "i123" and answer.items[0].reason == "exact title match"
    brand = searcher.search("nordic glow", k=10)
    assert all(catalog.meta_of(i.item_id).brand == "Nordic Glow" for i in brand.items)
    words = searcher.search("rose lip balm", k=10)
    assert all("Rose" in i.title or "Lip Balm" in i.title for i in words.items)
    world["histories"].add("u1", ["i3", "i7", "i11"], [VIEW, VIEW, PURCHASE])
    personal = searcher.search("face cream", user_id="u1", k=10)
    assert personal.items and personal.model_version == 1
    filtered = searcher.search("hair oil", k=10, filters=FilterSpec(exclude_purchased=False, max_price=5))
    assert all(catalog.meta_of(i.item_id).price <= 5 for i in filtered.items)
    searcher.search(TITLES[123], k=5)
    assert world["encoder"].calls == 5               # repeated query embedded once


def test_new_item_found_by_exact_title_without_a_model_update(world):
    searcher, catalog = world["searcher"], world["catalog"]
    title = "Zanzibar Vetiver Beard Balm Limited"
    catalog.apply([ItemUpdate("fresh-1", 3000, title=title, vector=fakes.text_vectors([title])[0])], 3000)
    answer = searcher.search(title, k=3)
    assert answer.items[0].item_id == "fresh-1" and answer.model_version == 1
    assert world["state"].current.index.contains(catalog.iid("fresh-1"))   # and recommendable at once


def test_similar_items(world):
    answer = world["recommender"].similar("i10", 5)
    assert len(answer.items) == 5 and "i10" not in {i.item_id for i in answer.items}
    assert answer.items[0].reason.startswith("similar to")
    with pytest.raises(NotFound):
        world["recommender"].similar("nope", 5)


def test_validation(world):
    recommender, searcher = world["recommender"], world["searcher"]
    for call in (lambda: recommender.recommend("", 5), lambda: recommender.recommend("u", 201),
                 lambda: searcher.search("", k=5), lambda: searcher.search("x" * 1025),
                 lambda: recommender.similar("", 3), lambda: FilterSpec(min_price=5, max_price=1)):
        with pytest.raises(InvalidArgument):
            call()
    assert len(recommender.recommend("u", 0).items) == 10       # k unset = 10


def test_every_request_passes_admission_after_its_read_your_writes_wait(world):
    recommender, searcher, admission = world["recommender"], world["searcher"], world["admission"]
    with admission.admit(None):                  # the only slot is taken and nobody may wait
        for call in (lambda: recommender.recommend("u1", 5), lambda: searcher.search("Rose", k=5),
                     lambda: recommender.similar("i1", 5)):
            with pytest.raises(ResourceExhausted):
                call()
        # Waiting for data comes first (it holds no slot): an unmet min_data_lsn is reported as
        # such, not as overload.
        with pytest.raises(FailedPrecondition):
            recommender.recommend("u1", 5, min_data_lsn=5000, timeout_s=0.05)
        with pytest.raises(FailedPrecondition):
            searcher.search("Rose", k=5, min_data_lsn=5000, timeout_s=0.05)
    assert admission.running == 0 and recommender.recommend("u1", 5).items


def test_admission_refuses_beyond_the_queue_at_once():
    admission = AdmissionControl(max_running=1, max_waiting=1)
    started, release = threading.Event(), threading.Event()
    results = []

    def hold():
        with admission.admit(None):
            started.set()
            release.wait(30)

    def wait_in_queue():
        try:
            with admission.admit(30):
                results.append("ran")
        except ResourceExhausted:
            results.append("refused")

    holder = threading.Thread(target=hold)
    holder.start()
    started.wait(30)
    queued = threading.Thread(target=wait_in_queue)
    queued.start()
    while admission.waiting == 0:
        time.sleep(0.001)
    with pytest.raises(ResourceExhausted):
        with admission.admit(30):
            pass
    other = AdmissionControl(max_running=1, max_waiting=5)
    with other.admit(None):
        with pytest.raises(ResourceExhausted):    # no slot can free up before a zero deadline
            with other.admit(0.0):
                pass
    release.set()
    holder.join(30)
    queued.join(30)
    assert results == ["ran"] and admission.rejected == 1


def test_waiting_requests_are_admitted_in_arrival_order_and_newcomers_queue_behind_them():
    admission = AdmissionControl(max_running=1, max_waiting=10)
    order, release = [], threading.Event()
    lock = threading.Lock()

    def request(name, hold=None):
        with admission.admit(30):
            with lock:
                order.append(name)
            if hold is not None:
                hold.wait(30)

    holder = threading.Thread(target=request, args=("holder", release))
    holder.start()
    while admission.running == 0:
        time.sleep(0.001)
    waiters = []
    for n in range(6):
        waiter = threading.Thread(target=request, args=(f"w{n}",))
        waiter.start()
        waiters.append(waiter)
        while admission.waiting < n + 1:      # each one queued before the next arrives
            time.sleep(0.001)
    release.set()
    # A request arriving while the queue drains takes its turn after every earlier waiter.
    late = threading.Thread(target=request, args=("late",))
    late.start()
    for thread in [holder, *waiters, late]:
        thread.join(30)
    assert order == ["holder", "w0", "w1", "w2", "w3", "w4", "w5", "late"]
    assert admission.running == 0 and admission.waiting == 0 and admission.rejected == 0


def test_a_waiter_whose_deadline_passes_leaves_the_queue_and_the_slot_goes_on():
    admission = AdmissionControl(max_running=1, max_waiting=10)
    with admission.admit(None):
        with pytest.raises(ResourceExhausted):
            with admission.admit(0.05):
                pass
        assert admission.waiting == 0 and admission.rejected == 1
    assert admission.running == 0
    with admission.admit(0.05):                # the slot was not lost to the gone waiter
        assert admission.running == 1


def test_the_last_place_goes_to_a_new_item_with_traction(world):
    """i350..i399 have no learned id (the model knows ITEMS[:350]) and most have a popularity:
    with RANKER_NEW_ITEM_SLOTS=1 the best of them (text score + the model's popularity term)
    takes the 10th place; the other nine are the plain ranking's first nine. An id-less item
    without interactions never gets the place, nor one the filters or exclusions leave out."""
    world["histories"].add("u1", ["i1", "i2", "i3"], [VIEW, PURCHASE, VIEW])
    recommender = world["recommender"]
    state, catalog = world["state"], world["catalog"]
    plain = Recommender(catalog, state, recommender.path, new_item_slots=0).recommend("u1", 10)
    served = recommender.recommend("u1", 10)
    plain_ids = [item.item_id for item in plain.items]
    served_ids = [item.item_id for item in served.items]
    id_less = {f"i{n}" for n in range(350, N)}
    assert not id_less & set(plain_ids[:9])
    assert served_ids[:9] == plain_ids[:9] and served_ids[9] in id_less
    assert served.items[9].reason.startswith("new in the catalog, like ")
    assert not any(item.reason.startswith("new") for item in served.items[:9])
    assert recommender.new_item_slots == 1
    slotted = served_ids[9]
    assert catalog.popularity_of([catalog.iid(slotted)])[0] > 0
    # Popularity gone (features says 0 interactions): no longer a candidate.
    catalog.set_popularity([catalog.iid(f"i{n}") for n in range(350, N)], [0.0] * (N - 350))
    assert [item.item_id for item in recommender.recommend("u1", 10).items] == plain_ids
    # One new item with traction again; a filter that leaves it out leaves the place to the ranking.
    catalog.set_popularity([catalog.iid("i351")], [5.0])
    again = [item.item_id for item in recommender.recommend("u1", 10).items]
    assert again[:9] == plain_ids[:9] and again[9] == "i351"
    other_category = FilterSpec(categories=("Beauty > Skin",))       # i351 is "Beauty > Lips"
    assert "i351" not in {item.item_id for item in recommender.recommend("u1", 10, other_category).items}
    excluded = FilterSpec(exclude_item_ids=("i351",))
    assert "i351" not in {item.item_id for item in recommender.recommend("u1", 10, excluded).items}
    # A one-item answer is the best item.
    assert [item.item_id for item in recommender.recommend("u1", 1).items] == plain_ids[:1]
