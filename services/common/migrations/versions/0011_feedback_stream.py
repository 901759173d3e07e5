"""The feedback join on the delta stream (issue 14).

- `impressions` joins the publication `deltarec_cdc`: the consistency service's feedback consumer
  receives impressions and events in commit order (services/consistency/feedback_stream.py says
  why the stream, not polling). Its primary key is its replica identity. The collector's
  COLLECTOR_CDC_TABLES default names it too (a publication of another name gets it at start).
- `events_recommendation_idx`: a partial index over the events that carry a recommendation_id,
  for the rebuild of the window from the tables on every (re)subscription (most events carry
  none, so it stays small).

Revision ID: 0011
Revises: 0010
"""
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UPGRADE = r"""
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'deltarec_cdc')
       AND NOT EXISTS (SELECT 1 FROM pg_publication_tables
                       WHERE pubname = 'deltarec_cdc' AND schemaname = 'public' AND tablename = 'impressions') THEN
        ALTER PUBLICATION deltarec_cdc ADD TABLE impressions;
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS events_recommendation_idx ON events (occurred_at)
    WHERE attributes ? 'deltarec.recommendation_id';
"""

DOWNGRADE = r"""
DROP INDEX IF EXISTS events_recommendation_idx;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_publication_tables
               WHERE pubname = 'deltarec_cdc' AND schemaname = 'public' AND tablename = 'impressions') THEN
        ALTER PUBLICATION deltarec_cdc DROP TABLE impressions;
    END IF;
END
$$;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
