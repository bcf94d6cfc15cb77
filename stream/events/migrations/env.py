"""Alembic environment: runs on the connection that EventStore.migrate() passes in."""

from __future__ import annotations

from alembic import context

from segstream.stream.events.schema import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
