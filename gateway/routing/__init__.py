"""Resilient routing: which deployment answers a model, retries while nothing has reached the
client, fallbacks to other models, circuit breakers and a retry budget per backend."""
