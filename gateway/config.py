"""Gateway configuration: one YAML file, validated by pydantic; errors name the exact key
(``backends.inkeep.base_url: ...``) and never print a secret.

``${VAR}`` and ``${VAR:-default}`` (the default also when VAR is empty) are substituted into
the parsed values, not pasted into the text: a value holding ``#``, ``: `` or braces is
taken as it is. An unset variable without a default is an error naming it and the key,
except in a backend's ``api_key``, where that backend answers 503 naming the variable.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG = Path("config/gateway.yaml")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    connect: float = Field(default=5.0, gt=0)
    read: float = Field(default=60.0, gt=0, description="max silence between upstream reads")
    total: float = Field(default=300.0, gt=0)


class BackendConfig(_Strict):
    kind: Literal["inkeep", "openai", "nuclia"]
    base_url: str = Field(min_length=1)
    api_key: SecretStr | None = None
    # The variable that should hold the credential, for the 503 message when it is empty.
    api_key_env: str | None = None
    kbid: str | None = None  # nuclia
    headers: dict[str, str] = Field(default_factory=dict)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    max_connections: int = Field(default=256, ge=1)
    # nuclia: build non-streamed answers from the stream, which keeps timeouts.read meaningful
    # (True: ask for one X-Synchronous JSON answer, sent only once it is all generated)
    synchronous: bool = False
    # False for upstreams that need no credential (local servers, public Nuclia KBs)
    requires_key: bool = True

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _nuclia_needs_kb(self) -> BackendConfig:
        if self.kind == "nuclia" and not self.kbid:
            raise ValueError("a nuclia backend needs 'kbid' (the Knowledge Box id)")
        return self

    def credential(self) -> str | None:
        value = self.api_key.get_secret_value() if self.api_key else ""
        return value or None


class CachePolicy(_Strict):
    enabled: bool = False
    ttl: float = Field(default=3600, gt=0)
    deterministic_only: bool = True


class ModelLimits(_Strict):
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


class DeploymentConfig(_Strict):
    """One backend that serves a model: its upstream model name and its share of traffic."""

    backend: str
    upstream_model: str | None = None
    weight: float = Field(default=1.0, gt=0)


class ModelConfig(_Strict):
    # one backend (`backend`, `upstream_model`), or several `deployments` sharing the traffic
    backend: str | None = None
    upstream_model: str | None = None
    deployments: list[DeploymentConfig] = Field(default_factory=list)
    # models tried in order when every deployment of this one failed before answering
    fallbacks: list[str] = Field(default_factory=list)
    retries: int = Field(default=2, ge=0, le=10)  # extra attempts on failures worth retrying
    description: str | None = None
    cache: CachePolicy | None = None
    # per-model defaults of the Nuclia ask request (generative_model, rag_strategies, ...)
    nuclia: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_way_to_name_backends(self) -> ModelConfig:
        if (self.backend is None) == (not self.deployments):
            raise ValueError("give either 'backend' or 'deployments' (a list of backends)")
        if self.deployments and self.upstream_model is not None:
            raise ValueError("with 'deployments', give each its own 'upstream_model'")
        names = [d.backend for d in self.deployments]
        if len(set(names)) != len(names):
            raise ValueError("deployments: each backend at most once per model")
        return self

    def deployment_list(self, name: str) -> list[DeploymentConfig]:
        """The deployments of the model called `name` (one for the `backend` form)."""
        if self.backend is not None:
            return [DeploymentConfig(backend=self.backend,
                                     upstream_model=self.upstream_model or name)]
        return [d if d.upstream_model else d.model_copy(update={"upstream_model": name})
                for d in self.deployments]


class BackoffConfig(_Strict):
    initial: float = Field(default=0.1, gt=0)  # seconds before the first retry (full jitter)
    max: float = Field(default=2.0, gt=0)


class RetryBudgetConfig(_Strict):
    """Retries to a backend are at most `ratio` of its requests over the last `window`
    seconds (plus `min_retries`), so that an outage does not multiply a vendor's load."""

    ratio: float = Field(default=0.2, ge=0, le=1)
    window: float = Field(default=10.0, gt=0)
    min_retries: int = Field(default=3, ge=0)


class CircuitConfig(_Strict):
    """A deployment is taken out after `failures` failures in a row, or when at least
    `min_requests` in `window` seconds failed at `error_rate` or more; after `cooldown`
    seconds one probe request decides whether it comes back."""

    failures: int = Field(default=5, ge=1)
    error_rate: float = Field(default=0.5, gt=0, le=1)
    min_requests: int = Field(default=10, ge=1)
    window: float = Field(default=30.0, gt=0)
    cooldown: float = Field(default=30.0, gt=0)


class RoutingConfig(_Strict):
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    # the longest a client request waits between attempts in all (an upstream's retry-after
    # beyond what is left is not waited for)
    max_wait: float = Field(default=10.0, ge=0)
    retry_budget: RetryBudgetConfig = Field(default_factory=RetryBudgetConfig)
    circuit: CircuitConfig = Field(default_factory=CircuitConfig)


class StaticKey(_Strict):
    id: str = Field(min_length=1)
    team: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str | None = None
    models: list[str] | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)


class KeysConfig(_Strict):
    file: str = "keys.json"  # relative to the config file's folder, used without Redis
    pepper: SecretStr | None = None
    static: list[StaticKey] = Field(default_factory=list)
    cache_seconds: float = Field(default=1.0, ge=0)


class TeamConfig(_Strict):
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    daily_token_budget: int | None = Field(default=None, ge=1)
    monthly_token_budget: int | None = Field(default=None, ge=1)
    models: dict[str, ModelLimits] = Field(default_factory=dict)


class LimitsConfig(_Strict):
    fail_mode: Literal["fail_open", "fail_closed"] = "fail_open"
    default_max_tokens: int = Field(default=1024, ge=1)
    key_rpm: int | None = Field(default=None, ge=1)
    key_tpm: int | None = Field(default=None, ge=1)
    key_max_concurrent: int | None = Field(default=None, ge=1)


class CacheConfig(_Strict):
    scope: Literal["team", "global"] = "team"
    default: CachePolicy = Field(default_factory=CachePolicy)
    memory_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    max_entry_bytes: int = Field(default=1024 * 1024, ge=1)
    lock_seconds: float = Field(default=30.0, gt=0)


class SinkConfig(_Strict):
    name: str = Field(min_length=1)
    kind: Literal["inkeep", "webhook"]
    url: str = Field(min_length=1)
    api_key: SecretStr | None = None  # inkeep: the analytics API integration key
    secret: SecretStr | None = None  # webhook: HMAC-SHA256 signing secret
    timeout: float = Field(default=10.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)
    # webhook: records per POST; above 1 the body is a JSON array of records (one POST for
    # up to `batch` records that are ready together: far less CPU under load)
    batch: int = Field(default=1, ge=1, le=1000)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _batch_for_webhooks(self) -> SinkConfig:
        if self.batch > 1 and self.kind != "webhook":
            raise ValueError("batch: only webhook sinks take batches (the Inkeep Analytics "
                             "API takes one conversation per call)")
        return self


class OutboxConfig(_Strict):
    spool_dir: str = "var/outbox"  # relative to the config file's folder, used without Redis
    max_queue: int = Field(default=10_000, ge=1)
    dead_letter_after: float = Field(default=3600.0, gt=0)
    shutdown_grace: float = Field(default=5.0, ge=0)
    claim_idle_seconds: float = Field(default=30.0, gt=0)


class AnalyticsConfig(_Strict):
    sinks: list[SinkConfig] = Field(default_factory=list)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    # days of time-bucketed usage (the console's charts) kept in the store
    series_days: int = Field(default=30, ge=1, le=400)
    conversation_header: str = "x-conversation-id"
    user_header: str = "x-end-user-id"


class ResponsesConfig(_Strict):
    """Stored Responses API responses (``store: true``): kept this long for
    ``previous_response_id`` and ``GET /v1/responses/{id}``."""

    ttl_days: float = Field(default=30, gt=0)
    memory_max_entries: int = Field(default=10_000, ge=1)  # without Redis: oldest dropped

    @property
    def ttl_seconds(self) -> float:
        return self.ttl_days * 86400


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    admin_key: SecretStr | None = None
    log_level: str = "info"
    log_json: bool = True
    access_log: bool = False  # uvicorn's own line per request (the request log says more)
    request_log: bool = True  # one JSON line per finished exchange (gateway/request_log.py)
    # a connection that has not sent complete request headers by then is closed
    header_timeout: float = Field(default=10.0, gt=0)
    # beyond this many requests in progress, a 503 with retry-after (probes are exempt)
    max_concurrent_requests: int | None = Field(default=1000, ge=1)
    # after SIGTERM: /readyz says 503 and requests are still accepted for drain_delay, then
    # the requests in flight get shutdown_grace to finish
    drain_delay: float = Field(default=5.0, ge=0)
    shutdown_grace: float = Field(default=30.0, ge=0)


class ObservabilityConfig(_Strict):
    # tracing: OTLP/HTTP to this collector (its base URL: spans go to {otlp_endpoint}/v1/traces);
    # unset, the standard OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT variables decide; neither: off
    otlp_endpoint: str | None = None
    # prompts and answers on the spans: off, as they may hold personal data
    capture_content: bool = False

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (OTLP over HTTP)")
        return value


class GatewayConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    store: str = "memory"  # "memory" or a redis:// URL
    store_prefix: str = "gw"
    backends: dict[str, BackendConfig] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    keys: KeysConfig = Field(default_factory=KeysConfig)
    teams: dict[str, TeamConfig] = Field(default_factory=dict)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    analytics: AnalyticsConfig = Field(default_factory=AnalyticsConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    base_dir: Path = Path(".")  # the config file's folder: relative paths resolve against it

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be 'memory' or a redis:// URL")
        return value

    @model_validator(mode="after")
    def _models_use_known_backends_and_models(self) -> GatewayConfig:
        known = ", ".join(sorted(self.backends)) or "none"
        for name, model in self.models.items():
            for i, deployment in enumerate(model.deployment_list(name)):
                if deployment.backend not in self.backends:
                    where = "backend" if model.backend else f"deployments.{i}.backend"
                    raise ValueError(f"models.{name}.{where}: unknown backend "
                                     f"'{deployment.backend}' (known: {known})")
            for fallback in model.fallbacks:
                if fallback == name or fallback not in self.models:
                    raise ValueError(f"models.{name}.fallbacks: '{fallback}' is not another "
                                     "model of this config")
        return self

    def resolve(self, relative: str) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else self.base_dir / path

    @property
    def redis_url(self) -> str | None:
        return None if self.store == "memory" else self.store


@dataclass(frozen=True, slots=True)
class _Reference:
    """One ``${NAME}`` or ``${NAME:-default}`` of the file, by its placeholder's number."""

    name: str
    default: str | None


def _mask(text: str) -> tuple[str, str, list[_Reference]]:
    """The text with every reference replaced by a plain placeholder, which YAML reads as
    ordinary characters in any context (flow mappings, quotes, comments nearby), so that
    values are substituted after parsing and never change the document's structure."""
    tag = f"GWVAR{secrets.token_hex(4)}N"
    refs: list[_Reference] = []

    def mask(match: re.Match[str]) -> str:
        refs.append(_Reference(match.group(1), match.group(2)))
        return f"{tag}{len(refs) - 1}E"

    return _VAR.sub(mask, text), tag, refs


def _is_credential(path: tuple[str | int, ...]) -> bool:
    """A backend's api_key: left empty when unset, so the backend answers 503 naming it."""
    return len(path) == 3 and path[0] == "backends" and path[2] == "api_key"


class _Substitution:
    """Puts the environment's values into a parsed document's scalars."""

    def __init__(self, tag: str, refs: list[_Reference], env: Mapping[str, str]) -> None:
        self.pattern = re.compile(re.escape(tag) + r"(\d+)E")
        self.refs = refs
        self.env = env
        self.errors: list[str] = []
        self.credential_vars: dict[str, str] = {}  # backend name -> its api_key's variable

    def value(self, node: Any, path: tuple[str | int, ...] = ()) -> Any:
        if isinstance(node, dict):
            return {self._key(k, path): self.value(v, (*path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [self.value(v, (*path, i)) for i, v in enumerate(node)]
        if isinstance(node, str) and self.pattern.search(node):
            return self.pattern.sub(lambda m: self._lookup(int(m.group(1)), path), node)
        return node

    def _key(self, key: Any, path: tuple[str | int, ...]) -> Any:
        if isinstance(key, str) and self.pattern.search(key):
            where = ".".join(str(p) for p in path) or "the top level"
            self.errors.append(f"{where}: variables are substituted in values, not in keys")
        return key

    def _lookup(self, index: int, path: tuple[str | int, ...]) -> str:
        ref = self.refs[index]
        if _is_credential(path):
            self.credential_vars[str(path[1])] = ref.name
        value = self.env.get(ref.name)
        if value is None or (value == "" and ref.default is not None):
            if ref.default is not None:
                return ref.default
            if not _is_credential(path):
                self.errors.append(
                    f"{'.'.join(str(p) for p in path)}: the environment variable {ref.name} is "
                    f"not set (set it, or give a default: ${{{ref.name}:-...}})")
            return ""
        return value


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling)"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "\n".join(lines)


def _yaml_error(source: str, exc: yaml.YAMLError) -> ConfigError:
    """Where and what, without the snippet of the file YAML would quote (it may hold a
    secret written into the file)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "cannot be parsed"
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return ConfigError(f"{source}: not valid YAML{where}: {problem}")


def parse_config(
    text: str, *, base_dir: Path = Path("."), env: Mapping[str, str] | None = None,
    source: str = "<config>",
) -> GatewayConfig:
    """Parse, substitute ``${VAR}`` / ``${VAR:-default}`` into the parsed values, validate."""
    masked, tag, refs = _mask(text)
    try:
        parsed = yaml.safe_load(masked) if masked.strip() else {}
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from None
    env_source = os.environ if env is None else env
    substitution = _Substitution(tag, refs, env_source)
    data = substitution.value(parsed or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    if substitution.errors:
        raise ConfigError(f"{source}:\n" + "\n".join(substitution.errors))
    if "store" not in data and env_source.get("GATEWAY_REDIS_URL"):
        data["store"] = env_source["GATEWAY_REDIS_URL"]
    for name, var in substitution.credential_vars.items():
        spec = data["backends"][name]
        if isinstance(spec, dict):
            spec.setdefault("api_key_env", var)
    data["base_dir"] = base_dir
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}:\n{format_validation_error(exc)}") from None


def config_path(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG)


def load_config(path: str | Path | None = None) -> GatewayConfig:
    file = config_path(str(path) if path else None)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such configuration file") from None
    return parse_config(text, base_dir=file.resolve().parent, source=str(file))
