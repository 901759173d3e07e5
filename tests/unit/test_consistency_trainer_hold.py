"""After a rollback the trainer's loop does not publish straight over it: updates wait for a
threshold's worth of interactions past the data the rolled-back version saw."""
from __future__ import annotations

from types import SimpleNamespace

from services.trainer.scheduler import TrainingLoop


class FakeLog:
    def __init__(self, lsns: list[int]) -> None:
        self.lsns = lsns

    def high_water(self) -> int:
        return max(self.lsns, default=0)

    def count(self, after: int, upto: int) -> int:
        return sum(1 for lsn in self.lsns if after < lsn <= upto)


class FakeCore:
    def __init__(self, current_version: int, current_lsn: int, lsns: list[int], held_until: int) -> None:
        self.updates = 0
        pointer = SimpleNamespace(version=current_version)
        self.publisher = SimpleNamespace(current=lambda: SimpleNamespace(
            pointer=pointer, value={}, version=current_version, data_lsn=current_lsn))
        self.log = FakeLog(lsns)
        self.config = SimpleNamespace(threshold_events=10, publish_as="current")
        self.versions = SimpleNamespace(rollback_hold_lsn=lambda version: held_until)

    def default_strategy(self):
        return None

    def update(self, strategy, publish):
        self.updates += 1
        return SimpleNamespace(published=True, drift_exceeded=False)


def loop(core) -> TrainingLoop:
    return TrainingLoop(core, enabled=True, interval_s=3600, min_interactions=1)


def test_updates_wait_for_new_data_after_a_rollback():
    # v1 (data up to LSN 100) is current again; v2, rolled back, had seen data up to LSN 200.
    core = FakeCore(1, 100, list(range(101, 206)), held_until=200)
    loop(core).tick()
    assert core.updates == 0                 # 105 pending since v1, but only 5 past what v2 saw
    core.log.lsns.extend(range(206, 211))
    loop(core).tick()
    assert core.updates == 1                 # 10 new interactions v2 never saw: update from v1


def test_without_a_rollback_the_threshold_alone_decides():
    core = FakeCore(1, 100, list(range(101, 111)), held_until=0)
    loop(core).tick()
    assert core.updates == 1


def test_publishing_as_canary_holds_updates_while_a_canary_is_undecided():
    core = FakeCore(1, 100, list(range(101, 111)), held_until=0)
    core.config.publish_as = "canary"
    in_flight = SimpleNamespace(pointer=SimpleNamespace(version=2, share=0.5))
    core.publisher.canary = lambda: in_flight
    loop(core).tick()
    assert core.updates == 0 and "canary version 2" in core.held
    in_flight.pointer = None                 # decided: model/canary deleted
    loop(core).tick()
    assert core.updates == 1
