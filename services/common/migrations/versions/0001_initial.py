"""Initial schema: the catalog, the behaviour log, the feature store and model lineage.

Revision ID: 0001
Revises:
"""
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Plain SQL: the tables are shared with plain-SQL writers and logical replication consumers,
# so their exact Postgres shape (types, identities, constraints) is the contract.
UPGRADE = """
CREATE TABLE items (
    item_id      text PRIMARY KEY CHECK (length(item_id) BETWEEN 1 AND 128),
    title        text NOT NULL DEFAULT '',
    description  text NOT NULL DEFAULT '',
    category     text NOT NULL DEFAULT '',
    brand        text NOT NULL DEFAULT '',
    price        numeric(18, 9),
    currency     char(3),
    attributes   jsonb NOT NULL DEFAULT '{}'::jsonb,
    active       boolean NOT NULL DEFAULT true,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE events (
    id           bigserial PRIMARY KEY,
    event_id     text NOT NULL UNIQUE,
    event_type   text NOT NULL CHECK (event_type IN ('view','click','add_to_cart','purchase','search')),
    user_id      text NOT NULL,
    item_id      text,
    query        text,
    occurred_at  timestamptz NOT NULL,
    attributes   jsonb NOT NULL DEFAULT '{}'::jsonb,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_user_idx ON events (user_id, occurred_at);
CREATE INDEX events_item_idx ON events (item_id);

CREATE TABLE rejected_events (
    id           bigserial PRIMARY KEY,
    event_id     text,
    payload      jsonb NOT NULL,
    reason       text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE item_features (
    item_id            text PRIMARY KEY,
    active             boolean NOT NULL DEFAULT true,
    content_hash       text,
    embedding          bytea,
    fallback_embedding boolean NOT NULL DEFAULT false,
    title              text NOT NULL DEFAULT '',
    category           text NOT NULL DEFAULT '',
    brand              text NOT NULL DEFAULT '',
    price              numeric(18, 9),
    currency           char(3),
    views              bigint NOT NULL DEFAULT 0,
    clicks             bigint NOT NULL DEFAULT 0,
    add_to_carts       bigint NOT NULL DEFAULT 0,
    purchases          bigint NOT NULL DEFAULT 0,
    popularity         double precision NOT NULL DEFAULT 0,
    popularity_at      timestamptz,
    last_interaction   timestamptz,
    updated_lsn        bigint NOT NULL DEFAULT 0
);
CREATE INDEX item_features_lsn_idx ON item_features (updated_lsn);

CREATE TABLE user_features (
    user_id         text PRIMARY KEY,
    history         jsonb NOT NULL DEFAULT '[]'::jsonb,
    counters        jsonb NOT NULL DEFAULT '{}'::jsonb,
    recent_queries  jsonb NOT NULL DEFAULT '[]'::jsonb,
    updated_lsn     bigint NOT NULL DEFAULT 0
);

-- The LSN high-water mark of each consumer, written in the same transaction as its state,
-- so that a redelivered delta at or below it changes nothing.
CREATE TABLE consumer_offsets (
    consumer     text PRIMARY KEY,
    applied_lsn  bigint NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE model_versions (
    version          bigint PRIMARY KEY,
    parent_version   bigint REFERENCES model_versions (version),
    strategy         text NOT NULL,
    parameters       jsonb NOT NULL DEFAULT '{}'::jsonb,
    lsn_from         bigint NOT NULL DEFAULT 0,
    lsn_to           bigint NOT NULL DEFAULT 0,
    metrics          jsonb NOT NULL DEFAULT '{}'::jsonb,
    baseline_metrics jsonb NOT NULL DEFAULT '{}'::jsonb,
    train_seconds    double precision NOT NULL DEFAULT 0,
    sha256           text,
    artifact_uri     text,
    status           text NOT NULL CHECK (status IN ('candidate','published','rejected','rolled_back')),
    decision         text NOT NULL DEFAULT '',
    interactions     bigint NOT NULL DEFAULT 0,
    items            bigint NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- The Postgres artifact store (postgres://.../artifacts/<name>).
CREATE TABLE artifacts (
    name        text PRIMARY KEY,
    sha256      text NOT NULL,
    data        bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
"""

DOWNGRADE = """
DROP TABLE artifacts; DROP TABLE model_versions; DROP TABLE consumer_offsets;
DROP TABLE user_features; DROP TABLE item_features; DROP TABLE rejected_events;
DROP TABLE events; DROP TABLE items;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
