"""Schema for training and model lineage (trainer service).

trainer_interactions
    The trainer's durable record of the behaviour events it learns from, written from the
    `events` deltas of consumer group `trainer`, in the same transaction as the group's LSN
    high-water mark (consumer_offsets, consumer 'trainer'). Keyed by `event_id`, so a redelivered
    delta changes nothing. `commit_lsn` is the commit LSN of the delta batch that carried the
    row: it only grows along the stream, so "data up to LSN X" (a version's lsn_to) and "new since
    X" are exact partitions (per-change LSNs are not: concurrent transactions interleave).
    Search events (no item) are not recorded: the model learns from item interactions.

trainer_runs
    One row per model version the trainer made: how to (re)do it and how far it got, so that a
    run interrupted by a crash is finished or abandoned by the next leader, never published
    twice. `baseline_value` is the exact etcd `model/current` value the run was gated against
    and must compare-and-swap from (NULL: the key did not exist). `attempt` fences writers: a
    trainer only updates a run while the attempt it holds is still the row's.

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE IF NOT EXISTS trainer_interactions (
    event_id     text PRIMARY KEY,
    row_id       bigint NOT NULL DEFAULT 0,
    commit_lsn   bigint NOT NULL,
    user_id      text NOT NULL,
    item_id      text NOT NULL,
    event_type   text NOT NULL,
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS trainer_interactions_lsn_idx ON trainer_interactions (commit_lsn);

CREATE TABLE IF NOT EXISTS trainer_runs (
    version           bigint PRIMARY KEY REFERENCES model_versions (version) ON DELETE CASCADE,
    kind              text NOT NULL CHECK (kind IN ('full', 'update')),
    request           jsonb NOT NULL DEFAULT '{}'::jsonb,
    publish           boolean NOT NULL DEFAULT false,
    baseline_version  bigint NOT NULL DEFAULT 0,
    baseline_value    bytea,
    phase             text NOT NULL CHECK (phase IN ('training', 'trained', 'done')),
    attempt           integer NOT NULL DEFAULT 1,
    holder            text NOT NULL DEFAULT '',
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS trainer_runs_open_idx ON trainer_runs (phase) WHERE phase <> 'done';
"""

DOWNGRADE = """
DROP TABLE IF EXISTS trainer_runs;
DROP TABLE IF EXISTS trainer_interactions;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
