"""The ranker end to end: real collector, features and ranker processes, real Postgres and etcd.

One stack per module (its own database and etcd prefix). Models are published exactly as the
trainer does it: an artifact in a file:// artifact store and a compare-and-swap of
`model/current` in etcd. Waiting is by LSN (pg_current_wal_insert_lsn() after a write, then
`min_data_lsn`) or by polling Status with a generous deadline; nothing asserts on timings.
Tests run in file order and each publishes versions above the one being served.
"""
from __future__ import annotations

import importlib.util
import json
import random
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from deltarec.v1 import collector_pb2, collector_pb2_grpc, common_pb2, ranker_pb2, ranker_pb2_grpc
from scripts.launch import ServiceProcess
from services.common.artifacts import ArtifactStore
from services.common.etcd import Etcd
from tests import fakes
from tests.support import channel_to, wait_until, wal_lsn

pytestmark = pytest.mark.integration

if importlib.util.find_spec("services.features.__main__") is None:
    pytest.skip("the features service is not in this checkout yet", allow_module_level=True)

N_ITEMS = 200
N_USERS = 40
CATEGORIES = ["Beauty > Lips", "Beauty > Skin", "Beauty > Hair", "Beauty > Nails"]
WORDS = ["Rose", "Amber", "Cedar", "Mint", "Velvet", "Coral", "Jasmine", "Onyx"]
KINDS = ["Lip Balm", "Face Cream", "Hair Oil", "Nail Polish", "Serum", "Cleanser"]


def title_of(n: int) -> str:
    return f"{WORDS[n % 8]} {WORDS[(n // 8) % 8]} {KINDS[n % 6]} {n}"


ITEM_IDS = [f"item-{n}" for n in range(N_ITEMS)]


class Stack:
    features_address = ""

    def __init__(self, collector, ranker, ranker_process, etcd, store, engine, artifacts_dir):
        self.collector, self.ranker, self.ranker_process = collector, ranker, ranker_process
        self.etcd, self.store, self.engine, self.artifacts_dir = etcd, store, engine, artifacts_dir
        self.text = fakes.text_vectors([title_of(n) for n in range(N_ITEMS)])

    def status(self):
        return self.ranker.Status(ranker_pb2.RankerServiceStatusRequest(), timeout=10)

    def version(self) -> int:
        return self.status().freshness.model_version

    def artifact(self, version: int, extra_ids: int = 0) -> dict:
        artifact = fakes.make_artifact(version, ITEM_IDS, self.text, dim=32, popular=ITEM_IDS[:30],
                                          extra_ids=extra_ids)
        return fakes.store_artifact(self.store, artifact)

    def publish(self, version: int, extra_ids: int = 0) -> dict:
        spec = self.artifact(version, extra_ids)
        fakes.publish(self.etcd, spec)
        return spec

    def wait_version(self, version: int) -> None:
        wait_until(lambda: self.version() == version, f"the ranker to serve version {version}")

    def recommend(self, user_id: str, k: int = 10, timeout: float = 10, **fields):
        return self.ranker.Recommend(ranker_pb2.RecommendRequest(user_id=user_id, k=k, **fields), timeout=timeout)

    def search(self, query: str, k: int = 10, timeout: float = 10, **fields):
        return self.ranker.Search(ranker_pb2.SearchRequest(query=query, k=k, **fields), timeout=timeout)


def event(event_id: str, user: str, item_id: str, kind=common_pb2.EVENT_TYPE_PURCHASE) -> common_pb2.Event:
    return common_pb2.Event(event_id=event_id, type=kind, user_id=user, item_id=item_id)


@pytest.fixture(scope="module")
def stack(infra_env, database_url, tmp_path_factory):
    prefix = f"/test-{uuid.uuid4().hex[:10]}/"
    logs = tmp_path_factory.mktemp("logs")
    artifacts_dir = tmp_path_factory.mktemp("artifacts")
    env = {"DATABASE_URL": database_url, "ETCD_ENDPOINT": infra_env.etcd_endpoint, "ETCD_PREFIX": prefix,
           "GRPC_PORT": "0", "METRICS_PORT": "0", "LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_S": "2",
           "COLLECTOR_HEARTBEAT_S": "0.5"}
    processes = []
    etcd = Etcd(infra_env.etcd_endpoint, prefix)
    engine = sa.create_engine(database_url)
    try:
        collector_process = ServiceProcess("services.collector", env, log_dir=logs).start()
        processes.append(collector_process)
        collector = collector_pb2_grpc.CollectorServiceStub(channel_to(collector_process))
        collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=[
            common_pb2.Item(item_id=ITEM_IDS[n], title=title_of(n), category=CATEGORIES[n % 4],
                            brand=["Belle Rose", "Nordic Glow", "Kiko Labs"][n % 3], active=True,
                            price=common_pb2.Money(currency_code="EUR", units=3 + n % 40))
            for n in range(N_ITEMS)]), timeout=60)
        rng = random.Random(7)
        events = [event(f"seed-{u}-{i}", f"user-{u}", ITEM_IDS[rng.randrange(N_ITEMS)],
                        rng.choice([common_pb2.EVENT_TYPE_VIEW, common_pb2.EVENT_TYPE_PURCHASE]))
                  for u in range(N_USERS) for i in range(6)]
        collector.IngestEvents(collector_pb2.IngestEventsRequest(events=events), timeout=60)
        features_process = ServiceProcess("services.features", {**env, "COLLECTOR_ADDRESS": collector_process.address,
                                                                "FEATURES_TORCH_THREADS": "1"}, log_dir=logs).start()
        processes.append(features_process)
        store = ArtifactStore(artifacts_dir.as_uri())
        stack = Stack(collector, None, None, etcd, store, engine, artifacts_dir)
        stack.features_address = features_process.address
        stack.features_process = features_process     # a test kills it and starts it again
        stack.env = env
        stack.publish(1)
        ranker_process = ServiceProcess("services.ranker", {
            **env, "FEATURES_ADDRESS": features_process.address, "RANKER_REPLICA_ID": "ranker-it",
            "RANKER_MAX_LSN_WAIT_S": "60", "RANKER_USER_CACHE_TTL_S": "0.5", "RANKER_REGISTER_INTERVAL_S": "0.5",
            "RANKER_NEW_ITEM_STATS_INTERVAL_S": "0.5"},
            name="ranker", log_dir=logs).start(timeout_s=240)
        processes.append(ranker_process)
        stack.ranker = ranker_pb2_grpc.RankerServiceStub(channel_to(ranker_process))
        stack.ranker_process = ranker_process
        # features serves before its text model has loaded, and the item batch (and the events
        # committed after it) wait for the model: the stack is ready once every item is indexed.
        wait_until(lambda: stack.status().index_size == N_ITEMS, "the ranker to index every item", timeout_s=300)
        yield stack
    finally:
        restarted = getattr(locals().get("stack"), "features_process", None)
        if restarted is not None and restarted not in processes:
            processes.insert(processes.index(features_process) + 1, restarted)
        for process in reversed(processes):
            process.stop(timeout_s=20)
        etcd.close()
        engine.dispose()


def test_serves_the_published_model_and_registers(stack):
    stack.wait_version(1)
    status = stack.status()
    assert status.replica_id == "ranker-it" and status.index_size == N_ITEMS
    assert len(status.index_checksum) == 64

    def registered():
        kv = stack.etcd.get("rankers/ranker-it")
        value = None if kv is None else json.loads(kv.value)
        return value if value and value["index_checksum"] == stack.status().index_checksum else None
    value = wait_until(registered, "rankers/ranker-it to match Status")
    assert value["model_version"] == 1 and value["index_size"] == N_ITEMS
    assert stack.etcd.get("rankers/ranker-it").lease_id != 0


def test_unknown_user_gets_a_popular_list(stack):
    response = stack.recommend(f"stranger-{uuid.uuid4().hex}", 10)
    assert response.cold_start and len(response.items) == 10
    assert all(item.item_id in ITEM_IDS and item.title for item in response.items)
    assert response.freshness.model_version == stack.version() and response.variant.name == "current"


def test_known_user_gets_personal_recommendations_with_reasons(stack):
    response = stack.recommend("user-3", 10)
    assert not response.cold_start and len(response.items) == 10
    assert all(item.reason.startswith("because you") for item in response.items)
    similar = stack.ranker.SimilarItems(ranker_pb2.SimilarItemsRequest(item_id="item-5", k=5), timeout=10)
    assert len(similar.items) == 5 and "item-5" not in [i.item_id for i in similar.items]
    with pytest.raises(grpc.RpcError) as failure:
        stack.ranker.SimilarItems(ranker_pb2.SimilarItemsRequest(item_id="no-such-item", k=5), timeout=10)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


def test_min_data_lsn_waits_then_answers(stack):
    user, bought = f"ryw-{uuid.uuid4().hex[:8]}", "item-17"
    stack.collector.IngestEvents(collector_pb2.IngestEventsRequest(events=[event(f"ryw-{user}", user, bought)]),
                                 timeout=30)
    lsn = wal_lsn(stack.engine)
    response = stack.recommend(user, 20, timeout=90, min_data_lsn=lsn)
    assert response.freshness.data_lsn >= lsn
    assert not response.cold_start, "the purchase just ingested must be in the history used"
    assert bought not in [item.item_id for item in response.items]
    assert any(title_of(17) in item.reason for item in response.items)

    with pytest.raises(grpc.RpcError) as failure:
        stack.recommend(user, 5, timeout=1.0, min_data_lsn=lsn + (1 << 40))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    trailers = dict(failure.value.trailing_metadata())
    assert int(trailers["deltarec-data-lsn"]) >= lsn


def test_calls_waiting_for_their_lsn_do_not_hold_up_the_others(stack):
    """The ranker runs one handler at a time (GRPC_RUNNING_HANDLERS=1, its default); calls
    waiting for a min_data_lsn hand their place on, so other calls are answered meanwhile."""
    future_lsn = wal_lsn(stack.engine) + (1 << 40)
    waiting = [stack.ranker.Recommend.future(ranker_pb2.RecommendRequest(
        user_id=f"user-{n}", k=5, min_data_lsn=future_lsn), timeout=8.0) for n in range(4)]
    try:
        for n in range(20):
            response = stack.recommend(f"user-{n % 10}", 5, timeout=2.0)
            assert len(response.items) == 5
        assert not any(call.done() for call in waiting), "the waits were to outlast the other calls"
    finally:
        for call in waiting:
            with pytest.raises(grpc.RpcError) as failure:
                call.result()
            assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_new_item_is_found_by_exact_title_without_a_model_update(stack):
    version = stack.version()
    item_id = f"new-{uuid.uuid4().hex[:8]}"
    title = f"Quillon Marigold Cuticle Elixir {item_id}"
    stack.collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=[common_pb2.Item(
        item_id=item_id, title=title, category="Beauty > Nails", brand="Quillon", active=True)]), timeout=30)
    lsn = wal_lsn(stack.engine)
    response = stack.search(title, 5, timeout=90, min_data_lsn=lsn)
    assert response.items[0].item_id == item_id and response.items[0].reason == "exact title match"
    assert response.freshness.model_version == version == stack.version()


def test_deleted_item_is_never_recommended_again(stack):
    top = stack.recommend("user-5", 1).items[0]
    stack.collector.DeleteItems(collector_pb2.DeleteItemsRequest(item_ids=[top.item_id]), timeout=30)
    lsn = wal_lsn(stack.engine)
    stack.recommend("user-5", 5, timeout=90, min_data_lsn=lsn)          # this replica has applied the delete
    for user in [f"user-{u}" for u in range(N_USERS)] + ["someone-new"]:
        assert top.item_id not in [i.item_id for i in stack.recommend(user, 200).items]
    assert top.item_id not in [i.item_id for i in stack.search(top.title, 50).items]
    similar = stack.ranker.SimilarItems(ranker_pb2.SimilarItemsRequest(item_id="item-1", k=200), timeout=10)
    assert top.item_id not in [i.item_id for i in similar.items]


def test_hot_swap_under_load_fails_no_request(stack):
    current = stack.version()
    target = current + 1
    results: list[tuple[int, str]] = []
    stop = threading.Event()
    switched = threading.Event()

    def client():
        rng = random.Random(1)
        while not stop.is_set():
            user = f"user-{rng.randrange(N_USERS)}" if rng.random() < 0.8 else f"anon-{rng.randrange(10**6)}"
            try:
                response = stack.recommend(user, 10, timeout=10)
                results.append((response.freshness.model_version, ""))
                if response.freshness.model_version == target:
                    switched.set()
            except grpc.RpcError as error:
                results.append((0, error.code().name))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: len(results) >= 20, "requests before the publish")
        stack.publish(target)
        assert switched.wait(120), "answers never switched to the new version"
        after = len(results)
        wait_until(lambda: len(results) >= after + 50, "requests after the swap")
    finally:
        stop.set()
        thread.join(30)
    failures = [code for _, code in results if code]
    assert failures == [], f"{len(failures)} failed requests during the swap: {set(failures)}"
    versions = [version for version, _ in results]
    first_new = versions.index(target)
    assert set(versions[:first_new]) == {current} and set(versions[first_new:]) == {target}


def test_corrupt_artifact_is_refused_and_the_version_stays(stack):
    current = stack.version()
    bad = current + 1
    spec = stack.artifact(bad)
    path = Path(spec["uri"][len("file://"):])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    fakes.publish(stack.etcd, spec)
    status = wait_until(lambda: (lambda s: s if s.refused_version == bad else None)(stack.status()),
                        "the corrupt artifact to be refused")
    assert "checksum" in status.refused_reason
    assert status.freshness.model_version == current
    assert stack.recommend("user-1", 5).freshness.model_version == current
    # the next good version is taken
    stack.publish(bad + 1)
    stack.wait_version(bad + 1)


def test_canary_answers_a_fixed_fifth_of_users(stack):
    current = stack.version()
    canary = stack.artifact(current + 1)
    stack.etcd.put("model/canary", {**canary, "share": 0.2})
    wait_until(lambda: stack.status().canary_version == current + 1, "the canary to load")
    users = [f"shopper-{n}" for n in range(400)]

    def canary_users():
        chosen = set()
        for user in users:
            response = stack.recommend(user, 3)
            assert response.variant.name in ("current", "canary")
            expected = current + 1 if response.variant.name == "canary" else current
            assert response.variant.model_version == response.freshness.model_version == expected
            if response.variant.name == "canary":
                chosen.add(user)
        return chosen
    first = canary_users()
    assert 0.14 <= len(first) / len(users) <= 0.26
    assert canary_users() == first
    status = stack.status()
    assert status.canary_share == pytest.approx(0.2)
    # abort is one write
    stack.etcd.delete("model/canary")
    wait_until(lambda: stack.status().canary_version == 0, "the canary to be dropped")
    assert all(stack.recommend(user, 3).variant.name == "current" for user in list(first)[:20])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_memory_after_20_swaps_stays_within_10_percent_of_after_2(stack):
    # Models with a 40k-row id table (~5 MB of weights each) so that keeping old ones would show.
    pid = stack.ranker_process.process.pid
    version = stack.version()
    rss = {}
    for swap in range(1, 21):
        version += 1
        stack.publish(version, extra_ids=40_000)
        stack.wait_version(version)
        for user in range(5):
            stack.recommend(f"user-{user}", 10)
        if swap in (2, 20):
            time.sleep(2.5)   # the loader trims freed memory again 2 s after a swap
            rss[swap] = rss_bytes(pid)
    assert stack.status().swaps >= 20
    assert rss[20] <= rss[2] * 1.10, f"RSS grew from {rss[2] / 2**20:.0f} MiB to {rss[20] / 2**20:.0f} MiB"


class PrivateEtcd:
    """An etcd of this test only (the shared one must not go down under other tests), restartable
    on the same port and data directory."""

    def __init__(self, directory: Path) -> None:
        from scripts import infra
        self.infra, self.directory = infra, directory
        self.client_port, self.peer_port = infra.free_port(), infra.free_port()
        self.process = None

    def start(self) -> "PrivateEtcd":
        import subprocess
        client, peer = f"http://127.0.0.1:{self.client_port}", f"http://127.0.0.1:{self.peer_port}"
        self.process = subprocess.Popen(
            [self.infra.etcd_binary(), "--name", "t", "--data-dir", str(self.directory / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client, "--listen-peer-urls", peer,
             "--initial-advertise-peer-urls", peer, "--initial-cluster", f"t={peer}",
             "--initial-cluster-state", "new", "--log-level", "error"],
            stdout=open(self.directory / "etcd.log", "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: self.infra._etcd_healthy(self.client_port), "the private etcd")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"


def test_keeps_serving_while_etcd_is_down_and_resumes_the_watch(stack, start_service, tmp_path):
    private = PrivateEtcd(tmp_path).start()
    etcd = Etcd(private.endpoint, "/outage/")
    try:
        fakes.publish(etcd, stack.artifact(101))
        process = start_service("services.ranker", {
            **stack.env, "ETCD_ENDPOINT": private.endpoint, "ETCD_PREFIX": "/outage/",
            "FEATURES_ADDRESS": stack.features_address, "RANKER_REPLICA_ID": "ranker-outage",
            "RANKER_LEASE_TTL_S": "3"}, name="ranker-outage", timeout_s=240)
        ranker = ranker_pb2_grpc.RankerServiceStub(channel_to(process))

        def version() -> int:
            return ranker.Status(ranker_pb2.RankerServiceStatusRequest(), timeout=10).freshness.model_version
        wait_until(lambda: version() == 101, "version 101")
        private.stop()
        for user in range(20):       # etcd down: every request still answered by the loaded version
            response = ranker.Recommend(ranker_pb2.RecommendRequest(user_id=f"user-{user}", k=5), timeout=10)
            assert response.freshness.model_version == 101 and response.items
        private.start()
        fakes.publish(etcd, stack.artifact(102))
        wait_until(lambda: version() == 102, "the watch to resume and version 102 to be served")
        wait_until(lambda: (lambda kv: kv is not None and json.loads(kv.value)["model_version"] == 102)(
            etcd.get("rankers/ranker-outage")), "the registration to come back")
    finally:
        etcd.close()
        private.stop()


# ---------------------------------------------------------------------- issue 15: user state at the ranker

def registered_user_cache(stack) -> dict:
    kv = stack.etcd.get("rankers/ranker-it")
    return (json.loads(kv.value) if kv is not None else {}).get("user_cache") or {}


def test_read_your_writes_for_an_event_that_touches_no_item(stack):
    user = f"ryw-search-{uuid.uuid4().hex[:8]}"
    stack.recommend(user, 5)
    response = stack.collector.IngestEvents(collector_pb2.IngestEventsRequest(events=[common_pb2.Event(
        event_id=f"q-{user}", type=common_pb2.EVENT_TYPE_SEARCH, user_id=user, query="rose balm")]), timeout=30)
    assert response.accepted == 1 and response.commit_lsn > 0
    answer = stack.recommend(user, 5, timeout=30, min_data_lsn=response.commit_lsn)
    assert answer.freshness.data_lsn >= response.commit_lsn
    assert stack.status().freshness.data_lsn >= response.commit_lsn
    duplicate = stack.collector.IngestEvents(collector_pb2.IngestEventsRequest(events=[common_pb2.Event(
        event_id=f"q-{user}", type=common_pb2.EVENT_TYPE_SEARCH, user_id=user, query="rose balm")]), timeout=30)
    assert duplicate.duplicates == 1 and duplicate.commit_lsn == 0       # nothing stored, no LSN


def test_an_item_seen_500_interactions_ago_is_not_recommended(stack):
    user, first = f"long-{uuid.uuid4().hex[:8]}", "item-150"
    others = [f"item-{n}" for n in range(20)]          # 500 later interactions over 20 other items
    events = [event(f"long-{user}-0", user, first, common_pb2.EVENT_TYPE_VIEW)]
    events += [event(f"long-{user}-{n + 1}", user, others[n % 20], common_pb2.EVENT_TYPE_VIEW) for n in range(500)]
    response = stack.collector.IngestEvents(collector_pb2.IngestEventsRequest(events=events), timeout=60)
    assert response.accepted == 501
    default = stack.recommend(user, 200, timeout=60, min_data_lsn=response.commit_lsn)
    ids = {item.item_id for item in default.items}
    assert not default.cold_start and len(ids) >= 150           # the unseen items are all there
    assert first not in ids and not ids & set(others)           # seen 500 interactions ago: excluded
    unfiltered = stack.recommend(user, 200, filters=ranker_pb2.Filters(exclude_seen=False,
                                                                       exclude_purchased=False))
    assert first in {item.item_id for item in unfiltered.items}  # only the filter took it out


def test_anonymous_session_gets_personal_answers_from_its_items(stack):
    session = [ranker_pb2.SessionEvent(item_id="item-3", type=common_pb2.EVENT_TYPE_VIEW),
               ranker_pb2.SessionEvent(item_id="item-4", type=common_pb2.EVENT_TYPE_ADD_TO_CART)]
    answer = stack.recommend("", 10, session=session)
    ids = [item.item_id for item in answer.items]
    assert not answer.cold_start and len(ids) == 10 and not {"item-3", "item-4"} & set(ids)
    # (an item upserted by an earlier test has no learned id: "new in the catalog, like ...")
    assert all(item.reason.startswith(("because you", "new in the catalog, like ")) for item in answer.items)
    assert any(title_of(3) in item.reason or title_of(4) in item.reason for item in answer.items)
    with pytest.raises(grpc.RpcError) as failure:
        stack.recommend("", 10, session=[ranker_pb2.SessionEvent(item_id="item-3",
                                                                  type=common_pb2.EVENT_TYPE_SEARCH)])
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "session[0].type" in failure.value.details()
    with pytest.raises(grpc.RpcError) as failure:
        stack.recommend("", 10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in failure.value.details()


def test_a_new_item_with_traction_takes_the_last_place(stack):
    """An item created after the served model was trained has no learned id, so it reaches the
    ranking through its text alone. Once users buy it, features counts its popularity, the ranker
    reads it (GetItemFeatures, every RANKER_NEW_ITEM_STATS_INTERVAL_S) and the item takes the last
    place of personal answers (RANKER_NEW_ITEM_SLOTS=1, the default); the first nine stay the
    plain ranking's."""
    new_id = f"item-new-{uuid.uuid4().hex[:8]}"
    upserted = stack.collector.UpsertItems(collector_pb2.UpsertItemsRequest(items=[common_pb2.Item(
        item_id=new_id, title="Rose Amber Lip Balm Limited Edition", category=CATEGORIES[0], brand="Belle Rose",
        active=True, price=common_pb2.Money(currency_code="EUR", units=9))]), timeout=30)
    before: dict[str, list[str]] = {}
    for u in range(N_USERS):
        ids = [i.item_id for i in stack.recommend(f"user-{u}", 10, timeout=90, min_data_lsn=upserted.commit_lsn).items]
        if new_id not in ids:          # not in the plain top 10 (whose order the slot must keep)
            before[f"user-{u}"] = ids
        if len(before) == 3:
            break
    assert before, "the new item ranks high for every user: nothing to show"
    bought = stack.collector.IngestEvents(collector_pb2.IngestEventsRequest(events=[
        event(f"new-{new_id}-{b}", f"new-buyer-{new_id}-{b}", new_id) for b in range(5)]), timeout=30)
    assert bought.accepted == 5

    def slotted():
        answers = {user: [i.item_id for i in stack.recommend(user, 10, min_data_lsn=bought.commit_lsn).items]
                   for user in before}
        return answers if all(ids[9:] == [new_id] for ids in answers.values()) else None
    answers = wait_until(slotted, "the new item in the 10th place", timeout_s=90)
    for user, ids in answers.items():
        assert ids[:9] == before[user][:9], (user, ids, before[user])
    last = stack.recommend(next(iter(before)), 10).items[9]
    assert last.item_id == new_id and last.reason.startswith("new in the catalog, like ")
    # The registration says so: one place, candidates, the popularity reads working.
    new_items = wait_until(lambda: (lambda v: v if v.get("candidates") else None)(
        json.loads(stack.etcd.get("rankers/ranker-it").value).get("new_items") or {}), "registered candidates")
    assert new_items["slots"] == 1 and new_items["failing"] is False and new_items["last_read"] >= 1


def test_user_stream_resumes_after_features_is_killed(stack):
    user, bought = f"resume-{uuid.uuid4().hex[:8]}", "item-42"
    seeded = stack.collector.IngestEvents(collector_pb2.IngestEventsRequest(
        events=[event(f"r0-{user}", user, "item-41", common_pb2.EVENT_TYPE_VIEW)]), timeout=30)
    assert bought in {i.item_id for i in stack.recommend(user, 200, timeout=60,
                                                         min_data_lsn=seeded.commit_lsn).items}
    wait_until(lambda: registered_user_cache(stack).get("user_stream_live"), "the user stream to be live")
    before = registered_user_cache(stack)
    features = stack.features_process
    features.process.kill()                                     # no goodbye: the stream just breaks
    features.process.wait(30)
    wait_until(lambda: not registered_user_cache(stack).get("user_stream_live"), "the ranker to notice")
    bought_at = stack.collector.IngestEvents(collector_pb2.IngestEventsRequest(
        events=[event(f"r1-{user}", user, bought)]), timeout=30).commit_lsn
    stack.features_process = ServiceProcess(
        "services.features", {**features.env, "GRPC_PORT": str(features.port)}, name="features",
        log_dir=features.log_path.parent).start(timeout_s=240)
    resumed = wait_until(lambda: (lambda c: c if c.get("user_stream_live") and
                                  c.get("user_stream_lsn", 0) >= bought_at else None)(registered_user_cache(stack)),
                         "the user stream to resume past the purchase")
    assert resumed["user_stream_lsn"] >= before["user_stream_lsn"]
    # No min_data_lsn and the cache live: the answer comes from what the resumed stream said.
    answer = stack.recommend(user, 200)
    assert bought not in {item.item_id for item in answer.items}
    assert answer.freshness.data_lsn >= bought_at
