"""The canary decider against real etcd and Postgres: a decision is one transaction over
model/current, model/canary and the decider's lease; two deciders racing never both write; each
decision is recorded with its evidence in model_versions and the consistency history; the
impression buffer's batches land in the impressions table."""
from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from services.common.etcd import Etcd
from services.contracts.etcd_keys import MODEL_CANARY, MODEL_CURRENT
from services.contracts.model_pointer import ModelPointer
from services.feedback.decider import CanaryDecider, read_pointers
from services.feedback.impressions import ImpressionBuffer, postgres_writer
from services.feedback.online_metrics import Impression
from services.feedback.policy import ABORT, PROMOTE, Decision


def _pointer(version: int, share: float = 0.0) -> ModelPointer:
    return ModelPointer(version=version, uri=f"file:///m{version}.pt", sha256=f"{version:064x}", share=share)


@pytest.fixture
def etcd(infra_env, etcd_prefix):
    client = Etcd(infra_env.etcd_endpoint, etcd_prefix)
    yield client
    client.close()


def _publish(etcd, engine, current: int, canary: int) -> None:
    etcd.put(MODEL_CURRENT, _pointer(current).to_json())
    etcd.put(MODEL_CANARY, _pointer(canary, 0.2).to_json(canary=True))
    with engine.begin() as connection:
        for version in (current, canary):
            connection.execute(sa.text(
                "INSERT INTO model_versions (version, strategy, status) VALUES (:v, 'full', 'published') "
                "ON CONFLICT DO NOTHING"), {"v": version})


def test_two_deciders_racing_never_both_write(etcd, engine):
    _publish(etcd, engine, 1, 2)
    seen = read_pointers(etcd)
    deciders = [CanaryDecider(etcd, engine, f"decider-{n}", ttl_s=5) for n in range(2)]
    decisions = [Decision(PROMOTE, "better", {"n": 0}), Decision(ABORT, "worse", {"n": 1})]
    results, barrier = [None, None], threading.Barrier(2)

    def race(n):
        barrier.wait()
        results[n] = deciders[n].apply(decisions[n], seen)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1, results
    winner = results.index(True)
    after = read_pointers(etcd)
    assert after.canary is None
    assert after.current.version == (2 if decisions[winner].action == PROMOTE else 1)
    # The loser, even once it holds the lease, cannot write on what it read before.
    deciders[winner].leadership.resign()
    assert not deciders[1 - winner].apply(decisions[1 - winner], seen)
    with engine.connect() as connection:
        row = connection.execute(sa.text(
            "SELECT canary_decision, canary_evidence FROM model_versions WHERE version = 2")).one()
        history = connection.execute(sa.text(
            "SELECT summary, detail FROM consistency_history WHERE kind = 'canary'")).all()
    assert row.canary_decision == decisions[winner].action
    assert row.canary_evidence["evidence"] == decisions[winner].evidence
    assert len(history) == 1 and history[0].detail["canary_version"] == 2


def test_a_decider_without_the_lease_writes_nothing(etcd, engine):
    _publish(etcd, engine, 3, 4)
    holder = CanaryDecider(etcd, None, "holder")
    assert holder.leadership.try_acquire()
    other = CanaryDecider(etcd, None, "other")
    assert not other.apply(Decision(PROMOTE, "better", {}), read_pointers(etcd))
    assert read_pointers(etcd).canary.version == 4
    holder.leadership.resign()


def test_impressions_flushed_in_batches(engine):
    buffer = ImpressionBuffer(postgres_writer(engine), batch_size=2)
    for n in range(3):
        buffer.offer(Impression(f"rid-{n}", 5, "canary", "u1", ("a", 'b"q', "c"), 1_700_000_000.0 + n))
    buffer.offer(Impression("rid-0", 5, "canary", "u1", ("a",), 1_700_000_000.0))   # redelivery
    buffer.close()
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT recommendation_id, item_ids FROM impressions ORDER BY recommendation_id")).all()
    assert [(r[0], list(r[1])) for r in rows] == [("rid-0", ["a", 'b"q', "c"]), ("rid-1", ["a", 'b"q', "c"]),
                                                  ("rid-2", ["a", 'b"q', "c"])]
