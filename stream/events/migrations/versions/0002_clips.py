"""Event clips: the MP4's size (null: no clip) and whether it stopped at the cap.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("clip_bytes", sa.BigInteger, nullable=True))
        batch.add_column(
            sa.Column("clip_truncated", sa.Boolean, nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_column("clip_truncated")
        batch.drop_column("clip_bytes")
