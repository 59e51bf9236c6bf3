"""The cluster deploy files match what the cluster test (tests/cluster/) proves: three
RabbitMQ nodes with pause_minority, the services given every node and quorum queues, two
copies of each service."""

from __future__ import annotations

from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from deploy_helpers import DEPLOY

from shared.config import split_amqp_urls
from tests.cluster.rabbit_cluster import NODE_CONFIG, VHOST
from tests.cluster.test_cluster import COPIES

SERVICES = ("intake", "timer", "resolver", "notifier", "gateway")  # two copies of each
PARTITION_HANDLING = next(line for line in NODE_CONFIG.splitlines()
                          if line.startswith("cluster_partition_handling"))
NODES = 3  # the cluster test's RabbitCluster default


def _nodes_in(url_list: str) -> list[str]:
    urls = split_amqp_urls(url_list)
    assert {urlsplit(u).path.lstrip("/") for u in urls} == {VHOST}
    return [urlsplit(u).hostname or "" for u in urls]


def test_compose_cluster_matches_the_cluster_test(yaml_mod: ModuleType) -> None:
    compose = yaml_mod.safe_load((DEPLOY / "docker-compose.cluster.yml").read_text())
    services: dict[str, Any] = compose["services"]
    nodes = sorted(name for name in services if name.startswith("rabbitmq-"))
    assert len(nodes) == NODES
    config = (DEPLOY / "docker" / "rabbitmq" / "cluster.conf").read_text()
    assert PARTITION_HANDLING in config.splitlines()
    for node in nodes:
        assert services[node]["hostname"] == node
        assert f"rabbit@{node}" in config  # each node is in the peer list
        assert any(v.startswith("./docker/rabbitmq/cluster.conf:") for v in
                   services[node]["volumes"])
    for service in SERVICES:
        svc = services[service]
        assert svc["command"] == ["run", service]
        assert svc["deploy"]["replicas"] == COPIES
        env = svc["environment"]
        assert env["AFTERSALES_QUEUE_TYPE"] == "quorum"
        assert sorted(_nodes_in(env["AFTERSALES_AMQP_URL"])) == nodes
        assert "ports" not in svc  # two copies cannot share a host port
        for node in nodes:
            assert svc["depends_on"][node]["condition"] == "service_healthy"
    assert services["migrate"]["environment"]["AFTERSALES_QUEUE_TYPE"] == "quorum"


def test_kubernetes_cluster_matches_the_cluster_test(yaml_mod: ModuleType) -> None:
    k8s = DEPLOY / "k8s"
    docs = [d for d in yaml_mod.safe_load_all((k8s / "rabbitmq" / "rabbitmqcluster.yaml")
                                              .read_text()) if d]
    (rabbit,) = [d for d in docs if d["kind"] == "RabbitmqCluster"]
    assert rabbit["spec"]["replicas"] == NODES
    assert PARTITION_HANDLING in rabbit["spec"]["rabbitmq"]["additionalConfig"].splitlines()
    name = rabbit["metadata"]["name"]
    kust = yaml_mod.safe_load((k8s / "rabbitmq" / "kustomization.yaml").read_text())
    assert kust["resources"] == ["rabbitmqcluster.yaml"]

    # The Secret's example (secret.example.yaml once it stops being applied by -k).
    secret_file = next(p for p in (k8s / "secret.example.yaml", k8s / "secret.yaml")
                       if p.exists())
    secret = yaml_mod.safe_load(secret_file.read_text())
    hosts = _nodes_in(secret["stringData"]["AFTERSALES_AMQP_URL"])
    # The operator's pods: <name>-server-<i>.<name>-nodes
    assert hosts == [f"{name}-server-{i}.{name}-nodes" for i in range(NODES)]
    config = yaml_mod.safe_load((k8s / "configmap.yaml").read_text())
    assert config["data"]["AFTERSALES_QUEUE_TYPE"] == "quorum"
    for service in SERVICES:
        (deployment,) = [d for d in yaml_mod.safe_load_all(
            (k8s / f"{service}.yaml").read_text()) if d and d["kind"] == "Deployment"]
        assert deployment["spec"]["replicas"] >= COPIES, service
