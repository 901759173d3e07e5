"""Intentionally empty: a placeholder kept so that the revision chain stays whole.

It was reserved for the ranker service's tables, which turned out not to be needed (a ranker
keeps its state in memory and registers itself in etcd `rankers/<replica>`). It is not dropped:
databases that already ran it record `0005` in `alembic_version`, and Alembic refuses to upgrade
a database whose recorded revision no longer exists; 0006 also names it as its parent. It changes
nothing, either way.

Revision ID: 0005
Revises: 0004
"""
from alembic import op  # noqa: F401

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
