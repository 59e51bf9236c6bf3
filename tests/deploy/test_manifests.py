"""Docker image, docker-compose file and Kubernetes manifests: parse and sanity checks."""

from __future__ import annotations

import re
import shutil
import subprocess
from types import ModuleType
from typing import Any

import pytest
from deploy_helpers import DEPLOY, REPO

K8S = DEPLOY / "k8s"
SERVICES = {"intake": 9101, "timer": 9102, "resolver": 9103, "notifier": 9104}


def _docs(yaml_mod: ModuleType) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_mod.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def _of_kind(yaml_mod: ModuleType, kind: str) -> list[dict[str, Any]]:
    return [d for d in _docs(yaml_mod) if d.get("kind") == kind]


def test_all_yaml_parses(yaml_mod: ModuleType) -> None:
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        list(yaml_mod.safe_load_all(path.read_text(encoding="utf-8")))


def test_kustomization_lists_every_manifest_but_no_secret(yaml_mod: ModuleType) -> None:
    kust = yaml_mod.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    examples = {f for f in files if f.endswith(".example.yaml")}
    assert examples == {"secret.example.yaml"}
    assert set(kust["resources"]) == files - examples
    # `kubectl apply -k` must never overwrite the real Secret with placeholders.
    for name in kust["resources"]:
        for doc in yaml_mod.safe_load_all((K8S / name).read_text(encoding="utf-8")):
            assert not doc or doc.get("kind") != "Secret", name


def test_deployments(yaml_mod: ModuleType) -> None:
    deployments = {d["metadata"]["name"]: d for d in _of_kind(yaml_mod, "Deployment")}
    assert set(deployments) == {f"aftersales-{s}" for s in (*SERVICES, "gateway")}
    for service, port in SERVICES.items():
        dep = deployments[f"aftersales-{service}"]
        spec = dep["spec"]
        assert spec["replicas"] >= 2, service
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert container["args"] == ["run", service]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["AFTERSALES_METRICS_PORT"] == str(port)
        assert {p["containerPort"] for p in container["ports"]} == {port}
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            http = container[probe]["httpGet"]
            assert http["path"] == path, (service, probe)
            assert http["port"] in ("metrics", port), (service, probe)
        # The service's own grace fits inside the pod's, with a little room for the kubelet.
        grace = float(_config(yaml_mod)["AFTERSALES_SHUTDOWN_GRACE_SECONDS"])
        assert 0 < pod["terminationGracePeriodSeconds"] - grace <= 10, service
        res = container["resources"]
        assert res["requests"]["cpu"] and res["requests"]["memory"], service
        assert res["limits"]["cpu"] and res["limits"]["memory"], service
        refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
        assert refs == {"aftersales-config", "aftersales-secrets"}
        selector = spec["selector"]["matchLabels"]
        labels = spec["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()


def test_the_gateway_runs_two_stateless_copies_behind_one_port(yaml_mod: ModuleType) -> None:
    deployments = {d["metadata"]["name"]: d for d in _of_kind(yaml_mod, "Deployment")}
    spec = deployments["aftersales-gateway"]["spec"]
    assert spec["replicas"] >= 2
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["run", "gateway"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env == {"AFTERSALES_GATEWAY_PORT": "9105", "AFTERSALES_GATEWAY_BIND": "0.0.0.0"}
    assert [p["containerPort"] for p in container["ports"]] == [9105]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"]["path"] == path, probe
    grace = float(_config(yaml_mod)["AFTERSALES_SHUTDOWN_GRACE_SECONDS"])
    assert 0 < pod["terminationGracePeriodSeconds"] - grace <= 10
    services = {d["metadata"]["name"]: d for d in _of_kind(yaml_mod, "Service")}
    assert [p["port"] for p in services["aftersales-gateway"]["spec"]["ports"]] == [9105]
    pdbs = {d["metadata"]["name"] for d in _of_kind(yaml_mod, "PodDisruptionBudget")}
    assert "aftersales-gateway" in pdbs


def _config(yaml_mod: ModuleType) -> dict[str, str]:
    (cm,) = _of_kind(yaml_mod, "ConfigMap")
    return dict(cm["data"])


def test_pods_open_their_metrics_port_the_default_does_not(yaml_mod: ModuleType) -> None:
    assert _config(yaml_mod)["AFTERSALES_METRICS_BIND"] == "0.0.0.0"
    from shared.config import Settings

    assert Settings().metrics_bind == "127.0.0.1"


def test_compose_binds_to_loopback_and_takes_passwords_from_the_environment(
    yaml_mod: ModuleType
) -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    compose = yaml_mod.safe_load(text)
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert "--web.enable-lifecycle" not in compose["services"]["prometheus"]["command"]
    grafana = compose["services"]["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${")
    assert "--requirepass" in compose["services"]["redis"]["command"]
    for service in SERVICES:  # Docker's SIGKILL comes after the service's own grace
        svc = compose["services"][service]
        grace = float(svc["environment"]["AFTERSALES_SHUTDOWN_GRACE_SECONDS"])
        assert float(svc["stop_grace_period"].rstrip("s")) > grace, service
    # No password written in the file: every one is an environment reference.
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if "PASS" in key or "AUTH" in key.split("_")[-1]:
                assert str(value).startswith("${"), (name, key)
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--requirepass") + 1].startswith("${")
    for url in re.findall(r"(?:amqp|postgresql\+psycopg|redis)://[^\s]+", text):
        userinfo = url.split("://", 1)[1].split("@", 1)
        if len(userinfo) == 2:
            assert "${" in userinfo[0], url


def test_services_pdbs_config_and_job(yaml_mod: ModuleType) -> None:
    services = {d["metadata"]["name"]: d for d in _of_kind(yaml_mod, "Service")}
    pdbs = {d["metadata"]["name"]: d for d in _of_kind(yaml_mod, "PodDisruptionBudget")}
    for service, port in SERVICES.items():
        svc = services[f"aftersales-{service}"]
        assert [p["port"] for p in svc["spec"]["ports"]] == [port]
        assert svc["spec"]["selector"] == {"app.kubernetes.io/name": f"aftersales-{service}"}
        pdb = pdbs[f"aftersales-{service}"]
        assert pdb["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    (cm,) = _of_kind(yaml_mod, "ConfigMap")
    assert cm["data"]["AFTERSALES_QUEUE_TYPE"] == "quorum"
    (secret,) = _of_kind(yaml_mod, "Secret")
    for value in secret["stringData"].values():
        assert "CHANGE_ME" in value, "secret.yaml must hold placeholders only"
    (job,) = _of_kind(yaml_mod, "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    assert (K8S / "rabbitmq-quorum.md").is_file()


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (optional)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("kind: Deployment") == 5  # the four services and the gateway


def test_compose_file(yaml_mod: ModuleType) -> None:
    compose = yaml_mod.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    for needed in ("rabbitmq", "postgres", "redis", "migrate", "prometheus", "grafana"):
        assert needed in services
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13-management")
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for service, port in SERVICES.items():
        svc = services[service]
        assert svc["command"] == ["run", service]
        assert svc["environment"]["AFTERSALES_METRICS_PORT"] == str(port)
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # Niceness does not count between containers: the notifier yields by its CPU weight.
    default_weight = 1024
    assert services["notifier"]["cpu_shares"] < default_weight
    for service in ("intake", "timer", "resolver"):
        assert services[service].get("cpu_shares", default_weight) == default_weight
    # every build context, Dockerfile and bind-mounted host path exists
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context == REPO, name
            assert (context / build["dockerfile"]).is_file(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source} missing"
    prom_cmd = " ".join(services["prometheus"]["command"])
    config = re.search(r"--config\.file=/etc/prometheus/(\S+)", prom_cmd)
    assert config and (DEPLOY / "prometheus" / config.group(1)).is_file()


def test_dockerfile_paths_exist() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert re.search(r"^USER\s+(?!root|0\b)\S+", text, re.M), "must run as non-root"
    assert 'ENTRYPOINT ["aftersales"]' in text
    for source in re.findall(r"^COPY\s+(?!--from)(\S+)\s+\S+", text, re.M):
        assert (REPO / source).exists(), f"COPY source {source} missing"
    assert "pip install ." in text
