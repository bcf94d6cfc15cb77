"""The event store's tables (SQLAlchemy Core). Changes go through a migration in
migrations/versions, never through create_all."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()
VERSION_TABLE = "segstream_events_version"

events = sa.Table(
    "events",
    metadata,
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
    # The event clip (0002): its MP4's bytes, null while there is none.
    sa.Column("clip_bytes", sa.BigInteger, nullable=True),
    sa.Column("clip_truncated", sa.Boolean, nullable=False, server_default=sa.false()),
    # newest first with a keyset cursor on (start, id)
    sa.Index("ix_events_start_id", "start", "id"),
    sa.Index("ix_events_stream_start", "stream", "start"),
    sa.Index("ix_events_end", "end"),
)

outbox = sa.Table(
    "event_outbox",
    metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("stream", sa.String(64), nullable=False),
    sa.Column("type", sa.String(8), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # the change's JSON, as sent
    sa.Column("created", sa.Double, nullable=False),
    # AUTOINCREMENT: SQLite would otherwise reuse the numbers of delivered (deleted) rows,
    # and a target's cursor would skip the new ones.
    sqlite_autoincrement=True,
)

# Each delivery target (mqtt, webhook:<n>) reads the outbox in order from its own cursor.
cursors = sa.Table(
    "event_delivery_cursors",
    metadata,
    sa.Column("target", sa.String(128), primary_key=True),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
)
