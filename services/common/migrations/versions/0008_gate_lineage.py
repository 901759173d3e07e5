"""Every version recorded with its comparisons (issue 10).

model_versions.anchor_version / anchor_metrics: the last full retrain the gate bounded the
  cumulative loss against, and its metrics on the same slice as `metrics` and `baseline_metrics`
  (the parent's); NULL when the version was not compared with one (full trainings, first update
  after a full one: the anchor is the parent then).
model_versions.gate_evidence: 'sufficient' | 'insufficient' (slice below TRAINER_GATE_MIN_USERS:
  published without gating on noise) | 'no_baseline' (first version).
model_versions.full_version / full_metrics / full_train_seconds: on an incremental version, the
  shadow full retrain on the same data (same lsn_to, same slice) and its metrics and cost; on the
  shadow itself, shadow_of names the incremental version it measured.

Revision ID: 0008
Revises: 0007
"""
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE model_versions
    ADD COLUMN IF NOT EXISTS anchor_version bigint,
    ADD COLUMN IF NOT EXISTS anchor_metrics jsonb,
    ADD COLUMN IF NOT EXISTS gate_evidence text,
    ADD COLUMN IF NOT EXISTS full_version bigint,
    ADD COLUMN IF NOT EXISTS full_metrics jsonb,
    ADD COLUMN IF NOT EXISTS full_train_seconds double precision,
    ADD COLUMN IF NOT EXISTS shadow_of bigint;
"""

DOWNGRADE = """
ALTER TABLE model_versions
    DROP COLUMN IF EXISTS anchor_version, DROP COLUMN IF EXISTS anchor_metrics,
    DROP COLUMN IF EXISTS gate_evidence, DROP COLUMN IF EXISTS full_version,
    DROP COLUMN IF EXISTS full_metrics, DROP COLUMN IF EXISTS full_train_seconds,
    DROP COLUMN IF EXISTS shadow_of;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
