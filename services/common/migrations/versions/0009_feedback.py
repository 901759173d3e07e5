"""The feedback loop (issue 14).

impressions: one row per answer shown (recommendation_id, user, model version, variant, kind,
  the item ids in shown order, when), written in batches by services/feedback/impressions.py.
model_versions.canary_decision / canary_decided_at / canary_evidence: the canary decider's
  promote or abort of this version, with the test's evidence (services/feedback/decider.py).
consistency_history.kind admits 'canary' (the decisions, services/feedback/history_writer.py).

Revision ID: 0009
Revises: 0008
"""
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE IF NOT EXISTS impressions (
    recommendation_id text PRIMARY KEY,
    shown_at          timestamptz NOT NULL,
    user_id           text NOT NULL DEFAULT '',
    model_version     bigint NOT NULL,
    variant           text NOT NULL,
    kind              text NOT NULL,
    item_ids          text[] NOT NULL
);
CREATE INDEX IF NOT EXISTS impressions_shown_at_idx ON impressions (shown_at);
ALTER TABLE model_versions
    ADD COLUMN IF NOT EXISTS canary_decision text,
    ADD COLUMN IF NOT EXISTS canary_decided_at timestamptz,
    ADD COLUMN IF NOT EXISTS canary_evidence jsonb;
ALTER TABLE consistency_history DROP CONSTRAINT IF EXISTS consistency_history_kind_check;
ALTER TABLE consistency_history ADD CONSTRAINT consistency_history_kind_check
    CHECK (kind IN ('check', 'reconcile', 'rollback', 'canary'));
"""

DOWNGRADE = r"""
DELETE FROM consistency_history WHERE kind = 'canary';
ALTER TABLE consistency_history DROP CONSTRAINT IF EXISTS consistency_history_kind_check;
ALTER TABLE consistency_history ADD CONSTRAINT consistency_history_kind_check
    CHECK (kind IN ('check', 'reconcile', 'rollback'));
ALTER TABLE model_versions DROP COLUMN IF EXISTS canary_evidence,
    DROP COLUMN IF EXISTS canary_decided_at, DROP COLUMN IF EXISTS canary_decision;
DROP TABLE IF EXISTS impressions;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
