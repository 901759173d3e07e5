"""The training loop's scheduling (pure, on a fake core): quick first model then the full one,
shadow full retrains every N updates, and a full retrain when the cumulative bound is crossed."""
from __future__ import annotations

from types import SimpleNamespace

from services.trainer.scheduler import TrainingLoop


def version(number: int, kind: str, status: str = "published", epochs: int = 16, full_version: int = 0):
    return SimpleNamespace(version=number, kind=kind, strategy="full" if kind == "full" else "all-new",
                           status=status, parameters={"epochs": epochs}, full_version=full_version)


class FakeCore:
    def __init__(self, rows: list, current: int | None, pending: int = 0, drift_exceeded: bool = False,
                 publish_as: str = "current", canary: int = 0) -> None:
        self.rows = sorted(rows, key=lambda r: -r.version)
        self.trains: list[dict] = []
        self.updates = 0
        self.drift_exceeded = drift_exceeded
        pointer = SimpleNamespace(version=current) if current else None
        canary_pointer = SimpleNamespace(version=canary, share=0.5) if canary else None
        self.publisher = SimpleNamespace(current=lambda: SimpleNamespace(pointer=pointer, version=current or 0,
                                                                         data_lsn=100),
                                         canary=lambda: SimpleNamespace(pointer=canary_pointer))
        self.held = ""
        self.log = SimpleNamespace(high_water=lambda: 100 + pending,
                                   count=lambda after, upto: max(0, upto - after) if after else 5000)
        self.config = SimpleNamespace(threshold_events=10, epochs=16, publish_as=publish_as)
        self.catalog = SimpleNamespace(text_coverage=lambda: (0, 0))
        self.versions = SimpleNamespace(list=lambda limit: self.rows, rollback_hold_lsn=lambda v: 0,
                                        get=lambda v: next((r for r in self.rows if r.version == v), None))

    def train(self, **kwargs):
        self.trains.append(kwargs)
        return SimpleNamespace(published=True)

    def default_strategy(self):
        return None

    def update(self, strategy, publish):
        self.updates += 1
        return SimpleNamespace(published=not self.drift_exceeded, drift_exceeded=self.drift_exceeded)


def loop(core, **kwargs) -> TrainingLoop:
    return TrainingLoop(core, enabled=True, interval_s=3600, min_interactions=1, **kwargs)


def test_a_new_deployment_gets_a_quick_model_first_then_the_full_one():
    core = FakeCore([], current=None)
    loop(core, first_epochs=2).tick()
    assert core.trains == [{"epochs": 2, "publish": True}]
    core = FakeCore([version(1, "full", epochs=2)], current=1)
    loop(core, first_epochs=2).tick()
    assert core.trains == [{"publish": True}] and core.updates == 0      # full epochs (the config's)
    core = FakeCore([version(2, "full"), version(1, "full", epochs=2)], current=2, pending=10)
    loop(core, first_epochs=2).tick()
    assert core.trains == [] and core.updates == 1                          # then updates as usual
    core = FakeCore([], current=None)
    loop(core, first_epochs=0).tick()
    assert core.trains == [{"epochs": 0, "publish": True}]                 # setting off: the full one at once


def test_a_shadow_full_retrain_follows_every_n_published_updates():
    rows = [version(1, "full"), version(2, "update"), version(3, "update", status="rejected"), version(4, "update")]
    core = FakeCore(rows, current=4, pending=10)
    loop(core, shadow_full_every=3).tick()
    assert core.trains == [] and core.updates == 1                          # 2 published updates < 3
    core = FakeCore(rows, current=4, pending=10)
    loop(core, shadow_full_every=2).tick()
    assert core.trains == [{"publish": True, "shadow_of": 4}] and core.updates == 0
    shadowed = [version(1, "full"), version(2, "update"), version(4, "update", full_version=5),
                version(5, "full", status="candidate"), version(6, "update")]
    core = FakeCore(shadowed, current=6, pending=10)
    loop(core, shadow_full_every=2).tick()
    assert core.trains == [] and core.updates == 1                          # counting restarts after a shadow


def test_crossing_the_cumulative_bound_schedules_a_full_retrain():
    core = FakeCore([version(1, "full"), version(2, "update")], current=2, pending=10, drift_exceeded=True)
    loop(core).tick()
    assert core.updates == 1 and core.trains == [{"publish": True}]


def test_with_publish_as_canary_nothing_is_trained_while_a_canary_is_undecided():
    rows = [version(1, "full"), version(2, "update", status="candidate")]
    core = FakeCore(rows, current=1, pending=10, publish_as="canary", canary=2)
    loop(core).tick()
    assert core.updates == 0 and core.trains == [] and "canary version 2" in core.held
    core = FakeCore(rows, current=1, pending=10, publish_as="canary", canary=0)
    loop(core).tick()
    assert core.updates == 1 and core.held == ""                           # decided: updates resume
    core = FakeCore(rows, current=1, pending=10, publish_as="current", canary=2)
    loop(core).tick()
    assert core.updates == 1                      # publishing to current: an operator's canary holds nothing
