"""The trainer's failure drills, installed from outside the production core.

    python -m tests.trainer_drills        # the trainer service, with the drill hooks of the env

runs `services.trainer.__main__.main` exactly as the service does, with `DrillHooks` in its
core (services/trainer/runs.py `RunHooks`):

* `TRAINER_DRILL_HANG_AT=<point>` (training | artifact_written | published_etcd): the run blocks
  forever at that point, after printing `DELTAREC_FAULT hanging at <point> version=N`, so a
  test can kill -9 the process exactly there;
* `TRAINER_DRILL_DAMAGE_CANDIDATE=1`: every new candidate's scores are negated before the gate
  (`damage`), which the gate must refuse.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

import torch

from services.model.network import DeltaRecModel
from services.trainer.runs import RunHooks

log = logging.getLogger("deltarec.trainer.drills")


@torch.no_grad()
def damage(model: DeltaRecModel) -> None:
    """Negate every user vector (hence every score), in place."""
    model.output_norm.weight.neg_()
    model.output_norm.bias.neg_()
    model.empty_history_vector.neg_()


class DrillHooks(RunHooks):
    def __init__(self, hang_at: str = "", damage_candidate: bool = False) -> None:
        if hang_at and hang_at not in RunHooks.POINTS:
            raise ValueError(f"TRAINER_DRILL_HANG_AT: one of {', '.join(RunHooks.POINTS)}, not {hang_at!r}")
        self.hang_at, self.damage_candidate = hang_at, damage_candidate

    @classmethod
    def from_env(cls) -> "DrillHooks":
        return cls(os.environ.get("TRAINER_DRILL_HANG_AT", ""),
                   os.environ.get("TRAINER_DRILL_DAMAGE_CANDIDATE", "") in ("1", "true"))

    def at(self, point: str, version: int) -> None:
        if point == self.hang_at:
            log.warning("failure drill: hanging", extra={"point": point, "version": version})
            print(f"DELTAREC_FAULT hanging at {point} version={version}", flush=True)
            threading.Event().wait()

    def candidate_trained(self, model, version: int) -> None:
        if self.damage_candidate:
            log.warning("failure drill: damaging the candidate", extra={"version": version})
            damage(model)


if __name__ == "__main__":
    from services.trainer.__main__ import main
    sys.exit(main(hooks=DrillHooks.from_env()))
