"""The trainer's publish-as-canary setting (issue 14).

model_versions.published_as: where the trainer published the version: 'current' (model/current)
  or 'canary' (model/canary, TRAINER_PUBLISH_AS=canary); NULL while it was not published.
model_versions.canary_share: the share of users the canary was published with.
A canary's status stays 'candidate' until its decision: the trainer records it 'published' when
the canary became model/current (promoted), 'rejected' when it was aborted (services/trainer/
runs.py `settle_canaries`), so 'published' keeps meaning "was model/current" for the rollbacks
and restores that look for published versions.

Revision ID: 0010
Revises: 0009
"""
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE model_versions
    ADD COLUMN IF NOT EXISTS published_as text CHECK (published_as IN ('current', 'canary')),
    ADD COLUMN IF NOT EXISTS canary_share double precision;
"""

DOWNGRADE = """
ALTER TABLE model_versions DROP COLUMN IF EXISTS published_as, DROP COLUMN IF EXISTS canary_share;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
