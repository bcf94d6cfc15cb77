"""Zones, coverage events, the event store and alerts (MQTT, Home Assistant, webhooks).

Modules, one job each: config (pydantic models), zones (rasterise + coverage), rules
(hysteresis -> event changes), model (Event, Change), schema + migrations (tables, alembic),
store (SQLAlchemy Core on SQLite/PostgreSQL), recorder (writer and pruner threads), delivery
(outbox consumer), mqtt, webhook, observer (metrics seam), feature (what the service calls)."""
