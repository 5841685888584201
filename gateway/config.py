"""Gateway configuration: one YAML file with ``${VAR}`` / ``${VAR:-default}`` interpolation,
validated by pydantic. Errors name the exact key (``backends.inkeep.base_url: ...``).
"""

from __future__ import annotations

import os
import re
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


class ModelConfig(_Strict):
    backend: str
    upstream_model: str | None = None
    description: str | None = None
    cache: CachePolicy | None = None
    # per-model defaults of the Nuclia ask request (generative_model, rag_strategies, ...)
    nuclia: dict[str, Any] = Field(default_factory=dict)


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
    conversation_header: str = "x-conversation-id"
    user_header: str = "x-end-user-id"


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    admin_key: SecretStr | None = None
    log_level: str = "info"
    log_json: bool = True
    access_log: bool = False


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
    base_dir: Path = Path(".")  # the config file's folder: relative paths resolve against it

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be 'memory' or a redis:// URL")
        return value

    @model_validator(mode="after")
    def _models_use_known_backends(self) -> GatewayConfig:
        for name, model in self.models.items():
            if model.backend not in self.backends:
                known = ", ".join(sorted(self.backends)) or "none"
                raise ValueError(
                    f"models.{name}.backend: unknown backend '{model.backend}' (known: {known})"
                )
        return self

    def resolve(self, relative: str) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else self.base_dir / path

    @property
    def redis_url(self) -> str | None:
        return None if self.store == "memory" else self.store


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` with values from the environment."""
    source = os.environ if env is None else env

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = source.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                return ""
            return default
        return value

    return _VAR.sub(replace, text)


def _credential_vars(raw: Any) -> dict[str, str]:
    """backend name -> the variable its api_key is read from, as written in the raw file."""
    found: dict[str, str] = {}
    backends = raw.get("backends") if isinstance(raw, dict) else None
    for name, spec in (backends or {}).items():
        if isinstance(spec, dict) and isinstance(spec.get("api_key"), str):
            match = _VAR.search(spec["api_key"])
            if match:
                found[name] = match.group(1)
    return found


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling)"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "\n".join(lines)


def parse_config(
    text: str, *, base_dir: Path = Path("."), env: dict[str, str] | None = None,
    source: str = "<config>",
) -> GatewayConfig:
    try:
        raw_yaml = yaml.safe_load(text) if text.strip() else {}
        data = yaml.safe_load(interpolate(text, env)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    env_source = os.environ if env is None else env
    if "store" not in data and env_source.get("GATEWAY_REDIS_URL"):
        data["store"] = env_source["GATEWAY_REDIS_URL"]
    for name, var in _credential_vars(raw_yaml).items():
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
