"""The ``gateway`` command: serve, check-config, and the key, team, usage and outbox tools."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.app import create_app
from gateway.cli import keys_command, outbox_command, usage_command
from gateway.cli.command import CONFIG_HELP, table
from gateway.config import (
    BackendConfig,
    ConfigError,
    GatewayConfig,
    config_path,
    load_config,
)
from gateway.demo import demo_app
from gateway.errors import GatewayError
from gateway.logs import configure_logging
from gateway.serving import GuardedHttpProtocol, ServeConfig, run
from gateway.tracing import otlp_endpoint


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    server = config.server
    host = args.host or server.host
    port = server.port if args.port is None else args.port
    workers = args.workers or server.workers
    configure_logging(server.log_level, json=server.log_json)
    if workers > 1 and (args.demo or not config.redis_url):
        why = ("--demo runs its sample upstreams in-process" if args.demo else
               "on the in-process store each worker would keep its own keys, limits and "
               f"cache (an rpm of 10 would admit {workers * 10}). Set `store: redis://...` "
               "(or GATEWAY_REDIS_URL), or run one worker per process")
        print(f"error: {workers} workers need a shared store: {why}.", file=sys.stderr)
        return 2
    app: Any = "gateway.cli.main:app_factory"
    metrics_dir = None
    if args.demo:
        app, banner = demo_app(config, host, port, handle_signals=True)
        print(banner, file=sys.stderr, flush=True)
    elif workers == 1:
        app = create_app(config, handle_signals=True)
    else:
        os.environ["GATEWAY_CONFIG"] = str(config_path(args.config))
        # every worker writes its metrics where /metrics (in any worker) aggregates them
        metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
    options = ServeConfig(
        app, factory=isinstance(app, str), workers=workers, host=host, port=port,
        header_timeout=server.header_timeout, http=GuardedHttpProtocol, loop="uvloop",
        lifespan="on", log_level=server.log_level, access_log=server.access_log,
        log_config=None,  # uvicorn's records go through configure_logging's handler
        server_header=False,
        # a backstop behind the drain's own cut at shutdown_grace
        timeout_graceful_shutdown=int(server.shutdown_grace) + 5)
    try:
        run(options)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def app_factory() -> Any:
    """Entry point of each worker under uvicorn's supervisor (it loads the config itself)."""
    config = load_config()
    configure_logging(config.server.log_level, json=config.server.log_json)
    return create_app(config, handle_signals=True)


def routing_table(config: GatewayConfig) -> str:
    """One row per deployment of each model (weight, fallbacks and retries on its first)."""
    rows = [("MODEL", "BACKEND", "WEIGHT", "KIND", "UPSTREAM MODEL", "BASE URL",
             "CREDENTIALS", "FALLBACKS", "RETRIES")]
    for name, model in sorted(config.models.items()):
        for i, deployment in enumerate(model.deployment_list(name)):
            backend = config.backends[deployment.backend]
            rows.append((
                name if i == 0 else "", deployment.backend, f"{deployment.weight:g}",
                backend.kind, deployment.upstream_model or name,
                backend.base_url + (f" (kb {backend.kbid})" if backend.kbid else ""),
                _credentials(backend),
                (",".join(model.fallbacks) or "-") if i == 0 else "",
                str(model.retries) if i == 0 else ""))
    lines = [table(rows)]
    store = "redis" if config.redis_url else "memory (in-process)"
    circuit = config.routing.circuit
    lines.append(f"\nstore: {store}; sinks: {len(config.analytics.sinks)}; "
                 f"static keys: {len(config.keys.static)}")
    lines.append(f"routing: retry budget {config.routing.retry_budget.ratio:.0%} of requests "
                 f"per {config.routing.retry_budget.window:g} s; circuits open after "
                 f"{circuit.failures} failures in a row or {circuit.error_rate:.0%} errors, "
                 f"for {circuit.cooldown:g} s")
    return "\n".join(lines)


def _credentials(backend: BackendConfig) -> str:
    if backend.credential():
        return "set"
    if not backend.requires_key:
        return "not needed"
    return f"missing: set {backend.api_key_env or 'api_key'}"


def tracing_line(config: GatewayConfig, environ: Mapping[str, str]) -> str:
    """Where spans would go, from the config and this environment's OTEL_* variables."""
    endpoint = otlp_endpoint(config.observability.otlp_endpoint, environ)
    if endpoint is None:
        return "tracing: off"
    content = "with" if config.observability.capture_content else "without"
    return f"tracing: OTLP/HTTP to {endpoint}, {content} prompts and answers"


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{config_path(args.config)}: ok\n")
    print(routing_table(config))
    print(tracing_line(config, os.environ))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help=CONFIG_HELP)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.add_argument("--demo", action="store_true",
                       help="also start local SAMPLE upstreams and route demo-* models to them")
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate the config and print the routing table")
    check.add_argument("--config", help=CONFIG_HELP)
    check.set_defaults(func=_check_config)

    for command in (keys_command, usage_command, outbox_command):
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:  # a store the command needs is unreachable
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
