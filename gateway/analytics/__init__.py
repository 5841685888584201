"""What happens to a finished exchange: usage metering, analytics mirroring through the outbox
to the sinks, and end-user feedback forwarded to Inkeep Analytics."""
