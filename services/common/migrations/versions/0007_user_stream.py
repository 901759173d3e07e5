"""User-state stream and whole-history seen sets (issue 15).

user_features.seen_items: every distinct item of the user's whole history as a JSON array of
  [item_id, purchased (0/1)], least recently touched first, bounded by FEATURES_SEEN_ITEMS (the
  least recently touched drop out; then seen_truncated). Backfilled here from the stored recent
  history (all a user's state had so far); features.RebuildUsers recomputes it from `events`.
user_features_updated_lsn_idx: (updated_lsn, user_id), the keyset of features.WatchUsers
  ("users changed after LSN L").

Revision ID: 0007
Revises: 0006
"""
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE user_features ADD COLUMN IF NOT EXISTS seen_items jsonb NOT NULL DEFAULT '[]'::jsonb;
ALTER TABLE user_features ADD COLUMN IF NOT EXISTS seen_truncated boolean NOT NULL DEFAULT false;
UPDATE user_features u SET seen_items = coalesce((
    SELECT jsonb_agg(jsonb_build_array(item_id, purchased) ORDER BY last_position)
    FROM (SELECT entry->>'item_id' AS item_id, max(position) AS last_position,
                 max(CASE WHEN entry->>'type' = 'purchase' THEN 1 ELSE 0 END) AS purchased
          FROM jsonb_array_elements(u.history) WITH ORDINALITY AS h(entry, position)
          WHERE entry->>'item_id' IS NOT NULL
          GROUP BY entry->>'item_id') AS distinct_items), '[]'::jsonb)
WHERE jsonb_array_length(u.history) > 0;
CREATE INDEX IF NOT EXISTS user_features_updated_lsn_idx ON user_features (updated_lsn, user_id);
"""

DOWNGRADE = r"""
DROP INDEX IF EXISTS user_features_updated_lsn_idx;
ALTER TABLE user_features DROP COLUMN IF EXISTS seen_truncated;
ALTER TABLE user_features DROP COLUMN IF EXISTS seen_items;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
