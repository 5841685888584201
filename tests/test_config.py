"""Configuration: interpolation, precise errors, secrets, and `gateway check-config`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.cli.main import main
from gateway.config import ConfigError, load_config, parse_config

GOOD = textwrap.dedent("""
    backends:
      inkeep:
        kind: inkeep
        base_url: ${INKEEP_BASE_URL:-https://api.inkeep.com/v1}
        api_key: ${INKEEP_API_KEY}
      kb:
        kind: nuclia
        base_url: https://europe-1.nuclia.cloud/api/v1
        kbid: abc
        api_key: ${NUCLIA_API_KEY:-}
    models:
      qa: {backend: inkeep, upstream_model: inkeep-qa}
      docs: {backend: kb}
""")


def test_variables_defaults_and_empty_values() -> None:
    text = ("server: {host: '${A}', log_level: ${B:-debug}, port: ${EMPTY:-81}}\n"
            "store_prefix: ${SET_EMPTY}x\n")
    config = parse_config(text, env={"A": "1.2.3.4", "EMPTY": "", "SET_EMPTY": ""})
    assert (config.server.host, config.server.log_level, config.server.port) == (
        "1.2.3.4", "debug", 81)
    assert config.store_prefix == "x"


@pytest.mark.parametrize("secret", ["sk-abc #def", "sk: abc", "{sk}", "'quoted\"", "a\nb"])
def test_values_are_taken_as_they_are(secret: str) -> None:
    """A value is put into the parsed document: a `#` does not cut it, a `: ` does not
    break the YAML around it, and a flow mapping may hold a reference."""
    text = ("backends:\n  b: {kind: inkeep, base_url: 'http://x/v1', api_key: ${KEY}}\n"
            "server: {port: ${PORT}}\n")
    config = parse_config(text, env={"KEY": secret, "PORT": "9000"})
    assert config.backends["b"].credential() == secret
    assert config.server.port == 9000


def test_an_unset_variable_is_an_error_naming_it_and_the_key() -> None:
    text = "backends:\n  b: {kind: inkeep, base_url: 'https://${HOST}/v1'}\n"
    with pytest.raises(ConfigError) as error:
        parse_config(text, env={})
    assert "backends.b.base_url: the environment variable HOST is not set" in str(error.value)


def test_an_unset_credential_is_left_for_the_backend_to_report() -> None:
    config = parse_config(GOOD, env={})
    assert config.backends["inkeep"].credential() is None
    assert config.backends["inkeep"].api_key_env == "INKEEP_API_KEY"


def test_errors_never_print_a_secret() -> None:
    secret = "sk-live-0123456789"
    bad_yaml = f"backends:\n  b: {{kind: inkeep, api_key: {secret}\n"
    with pytest.raises(ConfigError) as broken:
        parse_config(bad_yaml, env={})
    invalid = "backends:\n  b: {kind: inkeep, base_url: ftp://x, api_key: ${KEY}}\n"
    with pytest.raises(ConfigError) as refused:
        parse_config(invalid, env={"KEY": secret})
    for error in (broken, refused):
        assert secret not in str(error.value)
    assert "not valid YAML (line" in str(broken.value)


def test_parses_and_keeps_secrets_secret() -> None:
    config = parse_config(GOOD, env={"INKEEP_API_KEY": "sk-secret-value"})
    inkeep = config.backends["inkeep"]
    assert inkeep.base_url == "https://api.inkeep.com/v1"
    assert inkeep.credential() == "sk-secret-value"
    assert "sk-secret-value" not in repr(config) and "sk-secret-value" not in str(inkeep)
    assert inkeep.api_key_env == "INKEEP_API_KEY"
    assert config.backends["kb"].credential() is None
    assert config.backends["kb"].api_key_env == "NUCLIA_API_KEY"
    assert config.store == "memory"


def test_base_url_is_settable_from_the_environment() -> None:
    config = parse_config(GOOD, env={"INKEEP_BASE_URL": "http://127.0.0.1:9999/v1/"})
    assert config.backends["inkeep"].base_url == "http://127.0.0.1:9999/v1"


def test_redis_from_environment() -> None:
    config = parse_config(GOOD, env={"GATEWAY_REDIS_URL": "redis://127.0.0.1:6380/0"})
    assert config.redis_url == "redis://127.0.0.1:6380/0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("backends:\n  x: {kind: inkeep}\n", "backends.x.base_url: Field required"),
        ("backends:\n  x: {kind: inkeep, base_url: http://a, bse_url: 1}\n",
         "backends.x.bse_url: unknown key"),
        ("backends:\n  x: {kind: grpc, base_url: http://a}\n", "backends.x.kind: Input should be"),
        ("backends:\n  x: {kind: inkeep, base_url: ftp://a}\n",
         "backends.x.base_url: must start with http:// or https://"),
        ("backends:\n  x: {kind: nuclia, base_url: http://a}\n", "needs 'kbid'"),
        ("models:\n  m: {backend: nope}\n", "models.m.backend: unknown backend 'nope'"),
        ("server: {port: 99999}\n", "server.port: Input should be less than or equal to 65535"),
        ("store: mysql://x\n", "store: must be 'memory' or a redis:// URL"),
        ("observability: {otlp_endpoint: 'collector:4317'}\n",
         "observability.otlp_endpoint: must be an http:// or https:// URL"),
        ("observability: {capture: true}\n", "observability.capture: unknown key"),
        ("backends: [\n", "not valid YAML"),
        ("- 1\n", "top level must be a mapping"),
    ],
)
def test_errors_name_the_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(text, env={})
    assert expected in str(error.value)


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "gateway.yaml"
    good.write_text(GOOD)
    assert main(["check-config", "--config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "qa" in out and "inkeep-qa" in out and "missing: set INKEEP_API_KEY" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  m: {backend: nope}\n")
    assert main(["check-config", "--config", str(bad)]) == 2
    assert "models.m.backend: unknown backend 'nope'" in capsys.readouterr().err


def test_default_config_is_valid_and_python_m_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", "config/gateway.yaml"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "inkeep-qa" in result.stdout and "nuclia-kb" in result.stdout


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config("/nonexistent/gateway.yaml")


def test_several_workers_on_the_in_process_store_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(GOOD)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "2",
         "--port", "0"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "2 workers need a shared store" in result.stderr
    assert "redis://" in result.stderr


def test_check_config_takes_values_as_they_are(tmp_path: Path) -> None:
    """In a real process: a reference inside a flow mapping, and a secret holding ` #` and
    `: `, where the text used to be pasted into the YAML before parsing."""
    config = tmp_path / "gateway.yaml"
    config.write_text("server: {port: ${PORT}}\n" + GOOD)
    secret = "sk-abc #not-a-comment: really"
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PORT": "9123", "INKEEP_API_KEY": secret})
    assert result.returncode == 0, result.stderr
    assert "inkeep-qa" in result.stdout and secret not in result.stdout + result.stderr


def test_run_time_files_are_not_committed() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "config/keys.json", "config/keys.json.lock", "config/var/x"],
        capture_output=True, text=True, timeout=30)
    assert ignored.stdout.split() == ["config/keys.json", "config/keys.json.lock",
                                      "config/var/x"]


def test_check_config_shows_deployments_weights_and_fallbacks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.yaml"
    with_deployments = GOOD.replace("  docs: {backend: kb}\n", """  docs:
    deployments:
      - {backend: kb, weight: 3}
      - {backend: inkeep, upstream_model: inkeep-qa}
    fallbacks: [qa]
    retries: 1
""")
    assert with_deployments != GOOD
    config.write_text(with_deployments)
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    docs = [line.split() for line in out.splitlines() if "docs" in line or "inkeep-qa" in line]
    assert ["docs", "kb", "3", "nuclia", "docs"] == docs[0][:5] and docs[0][-2:] == ["qa", "1"]
    assert "routing: retry budget 20% of requests" in out


@pytest.mark.parametrize(("models", "expected"), [
    ("  m: {backend: b, deployments: [{backend: b}]}\n", "either 'backend' or 'deployments'"),
    ("  m: {}\n", "either 'backend' or 'deployments'"),
    ("  m: {deployments: [{backend: b}, {backend: b}]}\n", "each backend at most once"),
    ("  m: {deployments: [{backend: nope}]}\n", "models.m.deployments.0.backend: unknown"),
    ("  m: {backend: b, fallbacks: [m]}\n", "models.m.fallbacks: 'm' is not another model"),
])
def test_routing_mistakes_name_the_key(models: str, expected: str) -> None:
    text = "backends:\n  b: {kind: openai, base_url: 'http://x/v1'}\nmodels:\n" + models
    with pytest.raises(ConfigError, match=expected):
        parse_config(text, env={})


def test_check_config_tells_where_spans_go(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(GOOD)
    assert main(["check-config", "--config", str(config)]) == 0
    assert "\ntracing: off\n" in capsys.readouterr().out
    config.write_text(GOOD + "observability: {otlp_endpoint: 'http://collector:4318/',"
                             " capture_content: true}\n")
    assert main(["check-config", "--config", str(config)]) == 0
    assert "tracing: OTLP/HTTP to http://collector:4318/v1/traces, with prompts and answers" \
        in capsys.readouterr().out
