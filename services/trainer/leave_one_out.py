"""The leave-one-out split: train on all but each user's last two items, validate on the
second-to-last, test on the last."""

from __future__ import annotations

from dataclasses import dataclass

from services.trainer.interaction_data import UserHistory


@dataclass(frozen=True)
class EvalCase:
    """Predict ``target_item`` for ``user`` given ``history`` (strictly earlier)."""

    user: int
    history: UserHistory
    target_item: int
    target_time: float


@dataclass
class LeaveOneOutSplit:
    """Standard sequential-recommendation split.

    train: each user's sequence without its last two items;
    validation: predict the second-to-last from train;
    test: predict the last from train + the validation item.
    Users with fewer than 3 interactions only contribute training data.
    """

    train: dict[int, UserHistory]
    validation: list[EvalCase]
    test: list[EvalCase]


def leave_one_out_split(histories: dict[int, UserHistory]) -> LeaveOneOutSplit:
    train: dict[int, UserHistory] = {}
    validation: list[EvalCase] = []
    test: list[EvalCase] = []
    for user in sorted(histories):
        history = histories[user]
        if len(history) < 3:
            train[user] = history
            continue
        train[user] = history.head(-2)
        validation.append(
            EvalCase(user, history.head(-2), int(history.items[-2]), float(history.timestamps[-2]))
        )
        test.append(
            EvalCase(user, history.head(-1), int(history.items[-1]), float(history.timestamps[-1]))
        )
    return LeaveOneOutSplit(train, validation, test)
