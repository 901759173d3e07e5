"""Feature store additions (features service).

item_features:
  in_catalog       false once the item was deleted from the catalog (the row stays as a
                   tombstone so that WatchItems can tell watchers to remove it) or when the row
                   only holds statistics of an item not (yet) in the catalog.
  embedding_model  model that computed `embedding`; a different model makes it stale.
  stats_lsn        LSN of the last event folded into the statistics. Kept apart from
                   `updated_lsn` (catalog data and vector) so that WatchItems does not resend an
                   item's vector for every view it gets.
consumer_offsets (per consumer, written in the same transaction as its state):
  last_xid         xid of the last transaction applied: after a crash the collector may resend
                   already-applied transactions grouped with new ones; they are the prefix up to
                   this one.
  snapshot_lsn     consistent point of the initial snapshot whose rows were applied.
  snapshot_done    true once stream deltas followed that snapshot.
  stream_lsn       end LSN of the last commit applied from the stream (applied_lsn may be a few
                   units above it after a features Resync, whose writes are stamped just after
                   the current watermark so that WatchItems sends them).

Revision ID: 0003
Revises: 0002
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE item_features
    ADD COLUMN IF NOT EXISTS in_catalog boolean NOT NULL DEFAULT true,
    ADD COLUMN IF NOT EXISTS embedding_model text,
    ADD COLUMN IF NOT EXISTS stats_lsn bigint NOT NULL DEFAULT 0;
-- WatchItems pages through changes in (updated_lsn, item_id) order.
CREATE INDEX IF NOT EXISTS item_features_lsn_item_idx ON item_features (updated_lsn, item_id);
ALTER TABLE consumer_offsets
    ADD COLUMN IF NOT EXISTS last_xid bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS snapshot_lsn bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS snapshot_done boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS stream_lsn bigint NOT NULL DEFAULT 0;
"""

DOWNGRADE = """
DROP INDEX IF EXISTS item_features_lsn_item_idx;
ALTER TABLE consumer_offsets DROP COLUMN IF EXISTS stream_lsn, DROP COLUMN IF EXISTS snapshot_done,
    DROP COLUMN IF EXISTS snapshot_lsn, DROP COLUMN IF EXISTS last_xid;
ALTER TABLE item_features DROP COLUMN IF EXISTS stats_lsn, DROP COLUMN IF EXISTS embedding_model,
    DROP COLUMN IF EXISTS in_catalog;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
