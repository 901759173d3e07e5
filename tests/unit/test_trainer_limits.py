"""Defects 4-6 at the trainer's edge: numeric ranges, bounded work, no echo of huge input; and a
run that fails or whose caller goes away is decided at once (pure: a fake core, no server)."""
from __future__ import annotations

import types

import grpc
import pytest

from deltarec.v1 import trainer_pb2
from services.common.errors import InvalidArgument
from services.trainer.server import TrainerServicer, strategy_from_request


class FakeContext:
    def __init__(self) -> None:
        self.aborted = None

    def is_active(self) -> bool:
        return True

    def time_remaining(self):
        return None

    def abort(self, code, message):
        self.aborted = (code, message)
        raise Exception()  # what grpc's abort raises


class FakeCore:
    def __init__(self) -> None:
        self.config = types.SimpleNamespace(max_epochs=200)
        self.calls = []

    def train(self, **kwargs):
        self.calls.append(kwargs)
        raise AssertionError("validation must stop the request before the core")


@pytest.mark.parametrize("request_, field", [
    (trainer_pb2.TrainRequest(seed=2 ** 64 - 1), "seed"),
    (trainer_pb2.TrainRequest(seed=2 ** 32), "seed"),
    (trainer_pb2.TrainRequest(epochs=4294967295), "epochs"),
    (trainer_pb2.TrainRequest(epochs=201), "epochs"),
])
def test_train_out_of_range_is_invalid_argument_before_any_work(request_, field):
    core, context = FakeCore(), FakeContext()
    with pytest.raises(Exception):
        TrainerServicer(core).Train(request_, context)
    code, message = context.aborted
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith(f"{field}: ")
    assert core.calls == []


def test_a_megabyte_priority_is_refused_without_being_echoed():
    with pytest.raises(InvalidArgument) as info:
        strategy_from_request(trainer_pb2.UpdateStrategy(priority="p" * 1_000_000))
    assert str(info.value).startswith("strategy.priority: ") and len(str(info.value)) < 200
    with pytest.raises(InvalidArgument, match=r"^strategy\.window_seconds: "):
        strategy_from_request(trainer_pb2.UpdateStrategy(window_seconds=2 ** 64 - 1))
    with pytest.raises(InvalidArgument, match=r"^strategy\.threshold_events: "):
        strategy_from_request(trainer_pb2.UpdateStrategy(threshold_events=2 ** 64 - 1))


def test_get_version_beyond_a_bigint_is_invalid_argument():
    context = FakeContext()
    with pytest.raises(Exception):
        TrainerServicer(FakeCore()).GetVersion(trainer_pb2.GetVersionRequest(version=2 ** 64 - 1), context)
    assert context.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_a_failing_run_is_recorded_rejected_at_once():
    from services.trainer.runs import RunCancelled, TrainerCore
    finished = []
    core = TrainerCore.__new__(TrainerCore)
    core.progress = None
    core.versions = types.SimpleNamespace(finish=lambda run, status, reason: finished.append((status, reason)))
    run = types.SimpleNamespace(version=9, kind="full", attempt=1, lsn_to=5)
    for error, reason in ((RuntimeError("Seed must be between 0 and 2**32 - 1"), "failed: RuntimeError"),
                          (RunCancelled("cancelled before epoch 3"), "cancelled: the caller went away")):
        def boom(run_, inputs, error=error):
            raise error
        core._train_gate_store_publish = boom
        with pytest.raises(type(error)):
            core._execute(run)
        assert finished[-1] == ("rejected", reason)


def test_a_request_waits_for_a_running_job_only_as_long_as_its_caller():
    import threading

    from services.common.errors import Aborted
    from services.trainer.runs import Progress, TrainerCore
    core = TrainerCore.__new__(TrainerCore)
    core.job_lock, core.progress = threading.Lock(), Progress(7, "full")
    core.is_leader = lambda: True
    core.job_lock.acquire()                  # a training is running
    try:
        with pytest.raises(Aborted, match=r"busy: a training is running \(version 7, full\)"):
            with core._job("update", wait_s=0.05):
                pass
    finally:
        core.job_lock.release()
    with core._job("update", wait_s=0.05):   # free again: the job runs
        assert core.progress.kind == "update"
