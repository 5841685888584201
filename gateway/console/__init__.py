"""The operator console: server-rendered pages under ``/console`` (only when
``server.admin_key`` is set) for usage, keys and teams, analytics delivery and backends."""
