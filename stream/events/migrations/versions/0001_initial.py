"""Events, the delivery outbox and the targets' cursors.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("stream", sa.String(64), nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("class_name", sa.String(64), nullable=False),
        sa.Column("start", sa.Double, nullable=False),
        sa.Column("end", sa.Double, nullable=True),
        sa.Column("peak_coverage", sa.Double, nullable=False),
        sa.Column("peak_at", sa.Double, nullable=False),
        sa.Column("end_reason", sa.String(16), nullable=True),
        sa.Column("media_bytes", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_index("ix_events_start_id", "events", ["start", "id"])
    op.create_index("ix_events_stream_start", "events", ["stream", "start"])
    op.create_index("ix_events_end", "events", ["end"])
    op.create_table(
        "event_outbox",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("stream", sa.String(64), nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created", sa.Double, nullable=False),
        sqlite_autoincrement=True,  # never reuse a delivered row's number (see schema.py)
    )
    op.create_table(
        "event_delivery_cursors",
        sa.Column("target", sa.String(128), primary_key=True),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("event_delivery_cursors")
    op.drop_table("event_outbox")
    op.drop_table("events")
