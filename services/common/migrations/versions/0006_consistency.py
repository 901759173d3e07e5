"""Schema for the consistency service.

Functions (the SQL side of services/contracts/digest.py; IMMUTABLE so that expression indexes
can use them):
  deltarec_bucket(key, n)        first 4 bytes of md5(key), big-endian, mod n
  deltarec_leaf(text)            first 8 bytes of md5(text) as a (signed) bigint
  deltarec_content_hash(title, description, category, brand)
                                 services/features/content.py:content_hash, in SQL (layout "v1":
                                 sha256 of "v1" then each field as 8-byte little-endian length +
                                 utf-8 bytes), so the catalog side of a check never leaves Postgres
items.content_hash: that hash, a generated column (a new text layout needs a migration that
  redefines the function and recomputes the column).
Expression indexes on the bucket of items, item_features and user_features, so the rows of a
few differing buckets are read without a scan.

consistency_history: every check, repair and rollback, newest first (`History`).
user_features.rebuilt_snapshot: the Postgres snapshot (pg_snapshot text) a user's state was
  rebuilt from by features.RebuildUsers; the stream then skips events of transactions visible
  in it (they are already folded in), so a rebuild and the delta stream count every event once.
model_versions.rolled_back_to / rolled_back_at: set on the version a rollback replaced.

Revision ID: 0006
Revises: 0005
"""
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE OR REPLACE FUNCTION deltarec_bucket(key text, buckets integer) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS
$$ SELECT (('x' || '00000000' || substr(md5(key), 1, 8))::bit(64)::bigint % buckets)::integer $$;

CREATE OR REPLACE FUNCTION deltarec_leaf(value text) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS
$$ SELECT ('x' || substr(md5(value), 1, 16))::bit(64)::bigint $$;

-- plpgsql: each field is converted once (an SQL-language version repeats the conversions and
-- is not inlined; this one is about 6x faster).
CREATE OR REPLACE FUNCTION deltarec_content_hash(title text, description text, category text, brand text)
RETURNS text LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS
$$
DECLARE
    acc bytea := convert_to('v1', 'UTF8');
    field text;
    bytes bytea;
    n integer;
BEGIN
    FOREACH field IN ARRAY ARRAY[title, description, category, brand] LOOP
        bytes := convert_to(coalesce(field, ''), 'UTF8');
        n := length(bytes);
        acc := acc || set_byte(set_byte(set_byte(set_byte('\x0000000000000000'::bytea, 0, n & 255),
                                                 1, (n >> 8) & 255), 2, (n >> 16) & 255), 3, (n >> 24) & 255)
                   || bytes;
    END LOOP;
    RETURN encode(sha256(acc), 'hex');
END
$$;

-- The catalog keeps the hash of each item's embedding text, computed once per write, so a check
-- digests stored hashes instead of re-hashing every text (generated columns are not replicated:
-- the delta stream and its consumers do not see it).
ALTER TABLE items ADD COLUMN IF NOT EXISTS content_hash text
    GENERATED ALWAYS AS (deltarec_content_hash(title, description, category, brand)) STORED;

CREATE INDEX IF NOT EXISTS items_bucket_idx ON items (deltarec_bucket(item_id, 1024));
CREATE INDEX IF NOT EXISTS item_features_bucket_idx ON item_features (deltarec_bucket(item_id, 1024));
CREATE INDEX IF NOT EXISTS user_features_bucket_idx ON user_features (deltarec_bucket(user_id, 1024));

ALTER TABLE user_features ADD COLUMN IF NOT EXISTS rebuilt_snapshot text;
ALTER TABLE model_versions
    ADD COLUMN IF NOT EXISTS rolled_back_to bigint,
    ADD COLUMN IF NOT EXISTS rolled_back_at timestamptz;

CREATE TABLE IF NOT EXISTS consistency_history (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL CHECK (kind IN ('check', 'reconcile', 'rollback')),
    instance    text NOT NULL DEFAULT '',
    consistent  boolean,
    summary     text NOT NULL DEFAULT '',
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS consistency_history_at_idx ON consistency_history (at DESC, id DESC);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS consistency_history;
ALTER TABLE model_versions DROP COLUMN IF EXISTS rolled_back_at, DROP COLUMN IF EXISTS rolled_back_to;
ALTER TABLE user_features DROP COLUMN IF EXISTS rebuilt_snapshot;
DROP INDEX IF EXISTS user_features_bucket_idx;
DROP INDEX IF EXISTS item_features_bucket_idx;
DROP INDEX IF EXISTS items_bucket_idx;
ALTER TABLE items DROP COLUMN IF EXISTS content_hash;
DROP FUNCTION IF EXISTS deltarec_content_hash(text, text, text, text);
DROP FUNCTION IF EXISTS deltarec_leaf(text);
DROP FUNCTION IF EXISTS deltarec_bucket(text, integer);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
