"""Every etcd key DeltaRec uses, relative to the configured prefix (`ETCD_PREFIX`, default
`/deltarec/`; `services.common.etcd.Etcd` adds it). Writers and readers import the names from
here; the value each key holds is described beside it.
"""
from __future__ import annotations

MODEL_PREFIX = "model/"
"""Everything about which model is served (`model/current`, `model/canary`): rankers watch it."""

MODEL_CURRENT = MODEL_PREFIX + "current"
"""The version every ranker serves: a `ModelPointer` JSON (services/contracts/model_pointer.py).
Written only by the trainer leader's compare-and-swap (and by a consistency rollback)."""

MODEL_CANARY = MODEL_PREFIX + "canary"
"""A version served to a share of users: a `ModelPointer` JSON with `share` in [0, 1]; absent or
share 0 means no canary."""

DATA_WATERMARK = "data/watermark"
"""The LSN up to which features has applied the delta stream:
`{lsn, lsn_text, consumer, commit_time, published_at}` (services/features/watermark.py)."""

TRAINER_LEADER = "trainer/leader"
"""Held under a lease by the one trainer allowed to publish; the value is the holder's id."""

RANKERS_PREFIX = "rankers/"
"""`rankers/<replica>`: each ranker replica's registration on a lease (served version, data LSN,
index size and checksum); gone when the replica dies."""

COLLECTOR_SLOTS_PREFIX = "collector/slots/"
"""`collector/slots/<group>`: held under a lease by the collector that streams that consumer
group's replication slot (one stream per group, cluster-wide); the value is the holder's id."""

CONSISTENCY_REPAIRER = "consistency/repairer"
"""Held under a lease by the one consistency instance allowed to repair and roll back (any
instance may check); the value is the holder's id."""

CANARY_DECIDER = "canary/decider"
"""Held under a lease by the one canary decider allowed to promote or abort `model/canary`
(services/feedback/decider.py); the value is the holder's id, and every decision's transaction
compares it."""


def ranker_key(replica_id: str) -> str:
    return RANKERS_PREFIX + replica_id


def collector_slot_key(group: str) -> str:
    return COLLECTOR_SLOTS_PREFIX + group
