"""Change data capture (collector): the publication and the consumer-group state.

- Publication `deltarec_cdc` over `items` and `events` (the collector adds tables named in
  COLLECTOR_CDC_TABLES at start, and creates the publication named in COLLECTOR_PUBLICATION if
  that is another one).
- REPLICA IDENTITY DEFAULT (the primary key) on both tables, stated explicitly: deletes and
  key-changing updates then carry the old primary key, which is what consumers need to find the
  row they hold. Full old rows are not needed (consumers keep their own state).
- `cdc_consumer_groups`: one row per consumer group, written by the collector. `snapshot_done_at`
  stays NULL until the consumer acked the last batch of the group's initial snapshot; a group
  whose slot exists but whose snapshot was never acked is started over (slot dropped and created
  again, snapshot read again), which is what makes a crash during the snapshot safe.

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE cdc_consumer_groups (
    name              text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,40}$'),
    slot_name         text NOT NULL UNIQUE,
    tables            text[] NOT NULL,
    consistent_lsn    bigint NOT NULL,
    snapshot_rows     bigint NOT NULL DEFAULT 0,
    snapshot_done_at  timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE items REPLICA IDENTITY DEFAULT;
ALTER TABLE events REPLICA IDENTITY DEFAULT;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'deltarec_cdc') THEN
        CREATE PUBLICATION deltarec_cdc FOR TABLE items, events;
    END IF;
END
$$;
"""

DOWNGRADE = """
DROP PUBLICATION IF EXISTS deltarec_cdc;
DROP TABLE cdc_consumer_groups;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
