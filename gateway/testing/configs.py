"""Gateway configs for the tests and the benchmark, built as data and written as the YAML a
gateway reads: backends at given upstream URLs, models, static keys by SHA-256, store, sinks,
and any other section merged in. ``parse_config`` turns the text into a ``GatewayConfig``;
a file of it is what ``run_gateway`` serves.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from gateway.auth import hash_key

Section = Mapping[str, Any]


def static_key(secret: str, *, id: str, team: str, **fields: Any) -> dict[str, Any]:
    """A ``keys.static`` entry for `secret` (the config holds its SHA-256, never the key);
    `fields` are its limits (``rpm``, ``models``, ...)."""
    return {"id": id, "team": team, "sha256": hash_key(secret), **fields}


def config_yaml(*, backends: Mapping[str, Section], models: Mapping[str, Section],
                keys: Sequence[Section] = (), store: str = "memory",
                sinks: Sequence[Section] = (), extra: str | Section = "") -> str:
    """The YAML text of a config. `extra` (YAML text or a mapping) is merged in last, section
    by section (``server: {log_level: warning}`` keeps ``log_json``). ``${VAR}`` references
    stay in the text, for the gateway to read from its environment."""
    # no drain delay: nothing balances load in front of a test's gateway, which should stop
    # at once (tests of the drain set their own)
    data: dict[str, Any] = {"store": store, "server": {"log_json": True, "drain_delay": 0},
                            "backends": dict(backends), "models": dict(models)}
    if keys:
        data["keys"] = {"static": [dict(key) for key in keys]}
    if sinks:
        data["analytics"] = {"sinks": [dict(sink) for sink in sinks]}
    more = yaml.safe_load(textwrap.dedent(extra)) if isinstance(extra, str) else extra
    return yaml.safe_dump(_merged(data, more or {}), sort_keys=False)


def _merged(base: Section, more: Section) -> dict[str, Any]:
    """`base` with `more` laid over it, mapping into mapping (neither is changed)."""
    out = dict(base)
    for name, value in more.items():
        old = out.get(name)
        out[name] = _merged(old, value) if isinstance(old, Mapping) and \
            isinstance(value, Mapping) else value
    return out
