"""The ``gateway`` command line: serve, check-config, keys, teams, usage and the outbox."""
