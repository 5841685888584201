"""Shared state behind small Protocols, each with an in-process and a Redis implementation.

One module per concept (keys, limits, cache, usage, outbox); Redis atomicity lives in the
``lua/`` scripts shipped as package data.
"""
