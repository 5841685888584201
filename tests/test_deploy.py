"""The deployment files: the Kubernetes manifests, the compose file and the Dockerfile.

No cluster and no Docker engine are needed: the manifests are validated strictly (unknown
fields refused) against the Kubernetes API schemas that `kubernetes-validate` ships, the
compose file against the Compose Specification schema that `check-jsonschema` vendors, and
the properties a pod needs to start and to stop cleanly are checked on the parsed files,
including that the gateway itself accepts the config the ConfigMap carries.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import ConfigError, GatewayConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes.yaml"
SECRET_EXAMPLE = DEPLOY / "secret.example.yaml"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes the manifests claim to support and the newest whose schemas the
# installed kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30", "1.37")

# server.drain_delay and server.shutdown_grace: their defaults, for a gateway whose config
# does not have the keys yet (the values come from the parsed config once it does).
DRAIN_DELAY_DEFAULT = 5.0
SHUTDOWN_GRACE_DEFAULT = 30.0

# Volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def the(kind: str, name: str | None = None, path: Path = KUBERNETES) -> dict[str, Any]:
    found = [d for d in documents(path)
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {path.name}, found {len(found)}"
    return found[0]


def workloads() -> list[dict[str, Any]]:
    return [d for d in documents(KUBERNETES)
            if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def gateway_pod() -> dict[str, Any]:
    return pod_spec(the("Deployment", "gateway"))


def gateway_container() -> dict[str, Any]:
    containers = [c for c in gateway_pod()["containers"] if c["name"] == "gateway"]
    assert len(containers) == 1
    return containers[0]


def env_value(container: dict[str, Any], name: str) -> dict[str, Any]:
    entries = [e for e in container.get("env", []) if e["name"] == name]
    assert len(entries) == 1, f"{container['name']}: expected one env entry {name}"
    return entries[0]


def secret_example_keys() -> set[str]:
    return set(the("Secret", "gateway-secrets", SECRET_EXAMPLE)["stringData"])


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment Kubernetes gives the container: envFrom Secrets (with the example's
    keys and sample values), then env entries with $(VAR) expanded as the kubelet does."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert source["secretRef"]["name"] == "gateway-secrets"
        env.update({key: f"sample-{key.lower()}" for key in secret_example_keys()})
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)],
                                        entry["value"])
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "gateway-secrets"
            env[entry["name"]] = f"sample-{ref['key'].lower()}"
    return env


def config_map_config() -> tuple[str, PurePosixPath]:
    """The config text the ConfigMap carries and the path the gateway reads it from."""
    container = gateway_container()
    path = PurePosixPath(env_value(container, "GATEWAY_CONFIG")["value"])
    mount = mount_for(container, path)
    assert mount.get("readOnly") is True
    volume = volume_named(gateway_pod(), mount["name"])
    config_map = the("ConfigMap", volume["configMap"]["name"])
    text: str = config_map["data"][str(path.relative_to(mount["mountPath"]))]
    return text, path


def gateway_config() -> GatewayConfig:
    text, path = config_map_config()
    return parse_config(text, base_dir=Path(str(path.parent)),
                        env=container_env(gateway_container()), source="ConfigMap")


def mount_for(container: dict[str, Any], path: PurePosixPath) -> dict[str, Any]:
    """The volume mount that holds `path` (the deepest one)."""
    holding = [m for m in container.get("volumeMounts", [])
               if path == PurePosixPath(m["mountPath"])
               or PurePosixPath(m["mountPath"]) in path.parents]
    assert holding, f"{container['name']}: nothing is mounted at {path}"
    return max(holding, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))


def volume_named(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found = [v for v in pod.get("volumes", []) if v["name"] == name]
    assert len(found) == 1
    return found[0]


def shutdown_budget(config: GatewayConfig) -> float:
    """Seconds from SIGTERM until the gateway has exited at the latest."""
    server = config.server
    return (getattr(server, "drain_delay", DRAIN_DELAY_DEFAULT)
            + getattr(server, "shutdown_grace", SHUTDOWN_GRACE_DEFAULT)
            + config.analytics.outbox.shutdown_grace)


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert len(named) == 1, f"{container['name']}: no port named {port}"
    return int(named[0])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- schemas -------------------------------------------------------------------------------


def manifest_documents() -> Iterator[Any]:
    for path in (KUBERNETES, SECRET_EXAMPLE):
        for doc in documents(path):
            yield pytest.param(doc, id=f"{path.name}:{doc['kind']}/{doc['metadata']['name']}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("document", list(manifest_documents()))
def test_manifests_validate_strictly_against_the_kubernetes_schemas(
    document: dict[str, Any], version: str,
) -> None:
    # Raises on a schema mismatch, an unknown field, or a kind/apiVersion with no schema
    # (the CLI only warns about the last one; the function does not).
    assert kubernetes_validate.validate(document, version, strict=True) == version


def test_the_manifest_has_what_a_deployment_needs() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in documents(KUBERNETES))
    assert kinds == [
        ("ConfigMap", "gateway-config"), ("Deployment", "gateway"),
        ("NetworkPolicy", "gateway-redis"), ("PodDisruptionBudget", "gateway"),
        ("Service", "gateway"), ("Service", "gateway-redis"),
        ("StatefulSet", "gateway-redis"),
    ]


def test_strict_validation_refuses_unknown_fields_and_wrong_types() -> None:
    """The validator is not vacuous: what the kubelet or the API server would refuse fails."""
    deployment = the("Deployment", "gateway")
    unknown = yaml.safe_load(yaml.safe_dump(deployment))
    pod_spec(unknown)["containers"][0]["securityContext"]["runAsUserName"] = "gateway"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, KUBERNETES_VERSIONS[-1], strict=True)
    named_user = yaml.safe_load(yaml.safe_dump(deployment))
    pod_spec(named_user)["securityContext"]["runAsUser"] = "gateway"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(named_user, KUBERNETES_VERSIONS[-1], strict=True)


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_refuses_unknown_keys(tmp_path: Path) -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    compose["services"]["gateway"]["stop_grace"] = "45s"
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(compose), encoding="utf-8")
    result = check_compose(bad)
    assert result.returncode == 1 and "stop_grace" in result.stdout, result.stdout


# --- pod security --------------------------------------------------------------------------


def effective_security(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The container's security context with the pod's defaults under it."""
    pod_context = pod.get("securityContext", {})
    inherited = {k: pod_context[k] for k in
                 ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")
                 if k in pod_context}
    return inherited | container.get("securityContext", {})


@pytest.mark.parametrize("workload", workloads(),
                         ids=lambda w: f"{w['kind']}/{w['metadata']['name']}")
def test_pods_meet_the_restricted_pod_security_standard(workload: dict[str, Any]) -> None:
    pod = pod_spec(workload)
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert pod.get("automountServiceAccountToken") is False
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= RESTRICTED_VOLUME_TYPES, volume
    for container in pod["containers"] + pod.get("initContainers", []):
        context = effective_security(pod, container)
        name = container["name"]
        assert context.get("runAsNonRoot") is True, name
        # numeric, so that the kubelet can verify runAsNonRoot whatever the image says
        assert isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0, name
        assert isinstance(context.get("runAsGroup"), int) and context["runAsGroup"] > 0, name
        assert context.get("allowPrivilegeEscalation") is False, name
        assert not context.get("privileged"), name
        assert context.get("capabilities", {}).get("drop") == ["ALL"], name
        assert not context.get("capabilities", {}).get("add"), name
        assert context.get("readOnlyRootFilesystem") is True, name
        assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        assert not any(p.get("hostPort") for p in container.get("ports", [])), name


def dockerfile_user() -> str:
    """The USER of the Dockerfile's final stage."""
    stages = re.split(r"(?im)^FROM\s", DOCKERFILE.read_text(encoding="utf-8"))
    users = re.findall(r"(?im)^USER\s+(\S+)\s*$", stages[-1])
    assert len(users) == 1, f"expected one USER in the final stage, found {users}"
    return str(users[0])


def test_the_image_user_is_numeric_and_the_one_the_pods_run_as() -> None:
    user = dockerfile_user()
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), (
        f"USER {user}: the kubelet can only check runAsNonRoot against a numeric uid:gid")
    uid, gid = (int(part) for part in user.split(":"))
    context = effective_security(gateway_pod(), gateway_container())
    assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
    assert gateway_pod()["securityContext"]["fsGroup"] == gid


# --- config and credentials ----------------------------------------------------------------


def test_the_config_map_config_passes_the_gateways_validation() -> None:
    config = gateway_config()
    container = gateway_container()
    assert config.server.host == "0.0.0.0"
    assert config.server.port == port_number(container, "http")
    # the replicas share limits, cache, keys and usage: Redis, the one the manifest deploys
    assert config.redis_url == "redis://:sample-redis_password@gateway-redis:6379/0"
    assert set(config.models) >= {"inkeep-qa", "inkeep-agent", "nuclia-kb"}
    # the credentials arrive through the Secret
    assert config.backends["inkeep"].credential() == "sample-inkeep_api_key"
    assert config.backends["nuclia"].credential() == "sample-nuclia_api_key"
    assert config.server.admin_key is not None


def test_the_config_map_config_refuses_to_start_without_redis() -> None:
    text, path = config_map_config()
    env = container_env(gateway_container())
    del env["GATEWAY_REDIS_URL"]
    with pytest.raises(ConfigError, match="store"):
        parse_config(text, base_dir=Path(str(path.parent)), env=env)


def test_config_from_a_config_map_and_credentials_from_a_secret() -> None:
    container = gateway_container()
    text, _ = config_map_config()  # GATEWAY_CONFIG names a file of a read-only ConfigMap mount
    assert container["envFrom"] == [{"secretRef": {"name": "gateway-secrets"}}]
    keys = secret_example_keys()
    # every variable the config needs without a default is set in the container
    required = set(re.findall(r"\$\{(\w+)\}", text))
    assert "GATEWAY_REDIS_URL" in required
    assert required <= set(container_env(container)), required - set(container_env(container))
    # every credential the config reads is a key of the Secret, none a literal value
    for var in ("INKEEP_API_KEY", "INKEEP_AGENTS_API_KEY", "NUCLIA_API_KEY",
                "GATEWAY_ADMIN_KEY"):
        assert f"${{{var}:-}}" in text and var in keys, var
        assert all(e["name"] != var for e in container.get("env", [])), var
    # every secretKeyRef of every workload names a key of the Secret
    for workload in workloads():
        for c in pod_spec(workload)["containers"]:
            for entry in c.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "gateway-secrets" and ref["key"] in keys, entry


def test_what_the_gateway_writes_lies_on_writable_volumes() -> None:
    config = gateway_config()
    pod, container = gateway_pod(), gateway_container()
    spool = PurePosixPath(str(config.resolve(config.analytics.outbox.spool_dir)))
    assert spool.is_absolute()
    # the spool, and the usage file beside it, on a writable emptyDir, not the ConfigMap
    for path in (spool, spool.parent / "usage.jsonl"):
        mount = mount_for(container, path)
        assert not mount.get("readOnly"), path
        assert "emptyDir" in volume_named(pod, mount["name"]), path
    tmp = mount_for(container, PurePosixPath("/tmp"))
    assert tmp["mountPath"] == "/tmp" and not tmp.get("readOnly")
    assert "emptyDir" in volume_named(pod, tmp["name"])


# --- lifecycle -----------------------------------------------------------------------------


def test_termination_grace_exceeds_drain_delay_and_shutdown_grace() -> None:
    budget = shutdown_budget(gateway_config())
    assert budget >= DRAIN_DELAY_DEFAULT + SHUTDOWN_GRACE_DEFAULT
    assert gateway_pod()["terminationGracePeriodSeconds"] > budget


def test_probes_use_readyz_and_healthz() -> None:
    container = gateway_container()
    http = port_number(container, "http")
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz" and port_number(container, readiness["port"]) == http
    assert liveness["path"] == "/healthz" and port_number(container, liveness["port"]) == http


def test_no_service_link_variables_reach_the_gateway() -> None:
    """A Service named `gateway` would inject GATEWAY_PORT=tcp://... into the pods."""
    assert gateway_pod()["enableServiceLinks"] is False


def test_the_disruption_budget_selects_the_gateway_pods_and_allows_a_drain() -> None:
    deployment = the("Deployment", "gateway")
    pdb = the("PodDisruptionBudget", "gateway")["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert selects(pdb["selector"]["matchLabels"], labels)
    assert 1 <= pdb["maxUnavailable"] < deployment["spec"]["replicas"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_service_reaches_the_gateway_pods() -> None:
    service = the("Service", "gateway")["spec"]
    labels = the("Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    assert selects(service["selector"], labels)
    assert port_number(gateway_container(), service["ports"][0]["targetPort"]) == 8080


def test_the_redis_url_reaches_the_deployed_redis_and_only_the_gateway_may() -> None:
    url = gateway_config().redis_url
    assert url is not None
    match = re.fullmatch(r"redis://:[^@]+@([\w.-]+):(\d+)/0", url)
    assert match, url
    host, port = match.groups()
    service = the("Service", host)["spec"]
    redis = the("StatefulSet", "gateway-redis")
    assert selects(service["selector"], redis["spec"]["template"]["metadata"]["labels"])
    [service_port] = [p for p in service["ports"] if p["port"] == int(port)]
    [redis_container] = pod_spec(redis)["containers"]
    assert port_number(redis_container, service_port["targetPort"]) == 6379
    # a password, the same Secret key the gateway's URL uses
    assert "--requirepass" in redis_container["args"]
    assert env_value(redis_container, "REDIS_PASSWORD")["valueFrom"] == \
        env_value(gateway_container(), "REDIS_PASSWORD")["valueFrom"]
    # its data survives a restart: append-only file on a persistent volume
    assert redis_container["args"][redis_container["args"].index("--appendonly") + 1] == "yes"
    data = mount_for(redis_container, PurePosixPath("/data"))
    claims = [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]]
    assert data["name"] in claims
    policy = the("NetworkPolicy", "gateway-redis")["spec"]
    assert selects(policy["podSelector"]["matchLabels"],
                   redis["spec"]["template"]["metadata"]["labels"])
    [rule] = policy["ingress"]
    [source] = rule["from"]
    assert selects(source["podSelector"]["matchLabels"],
                   the("Deployment", "gateway")["spec"]["template"]["metadata"]["labels"])


# --- compose -------------------------------------------------------------------------------


def seconds(duration: str) -> float:
    """A compose duration such as 45s or 1m30s."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_runs_two_drain_friendly_read_only_replicas_on_one_redis() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = compose["services"]
    gateway, redis = services["gateway"], services["redis"]
    assert gateway["deploy"]["replicas"] == 2
    assert gateway["environment"]["GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    # the shipped config as the image runs it (it reads ${GATEWAY_REDIS_URL})
    image_config = PurePosixPath("/app/config/gateway.yaml")
    config = parse_config((ROOT / "config" / "gateway.yaml").read_text(encoding="utf-8"),
                          base_dir=Path(str(image_config.parent)),
                          env={"GATEWAY_REDIS_URL": "redis://redis:6379/0"})
    assert config.redis_url == "redis://redis:6379/0"
    assert seconds(gateway["stop_grace_period"]) > shutdown_budget(config)
    assert "CMD" in gateway["healthcheck"]["test"][0] and "/healthz" in " ".join(
        gateway["healthcheck"]["test"])
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    for service in (gateway, redis):
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", redis["user"])
    # the spool of the image's config lies on a volume, /tmp is a tmpfs
    spool = PurePosixPath(str(config.resolve(config.analytics.outbox.spool_dir)))
    targets = {PurePosixPath(v.split(":")[1]): v.split(":")[0] for v in gateway["volumes"]}
    assert any(t == spool or t in spool.parents for t in targets), (spool, targets)
    assert all(source in compose["volumes"] for source in targets.values())
    assert gateway["tmpfs"] == ["/tmp"]
