"""Several AMQP URLs (one per node of a RabbitMQ cluster) in AFTERSALES_AMQP_URL, and the
queue arguments of quorum mode."""

from __future__ import annotations

import pytest

from shared.amqp import (
    DELIVERY_LIMIT,
    RESOLVER_QUEUE,
    AftersalesBroker,
    connection_parameters_list,
    make_broker,
    work_queue_arguments,
)
from shared.config import load_settings, split_amqp_urls
from shared.errors import ConfigError

NODES = ("amqp://u:p@rabbit-0:5672/%2F", "amqp://u:p@rabbit-1:5673/%2F",
         "amqps://u:p@rabbit-2:5671/aftersales")


def test_a_single_url_is_a_list_of_one() -> None:
    assert split_amqp_urls("amqp://guest:guest@127.0.0.1:5672/%2F") == [
        "amqp://guest:guest@127.0.0.1:5672/%2F"]


def test_urls_are_split_on_commas_with_blanks_and_empty_parts_dropped() -> None:
    assert split_amqp_urls(f" {NODES[0]} ,{NODES[1]},, {NODES[2]},") == list(NODES)


@pytest.mark.parametrize("value", ["", " , ", "amqp://a/%2F,http://b/", "redis://x"])
def test_a_bad_list_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match=r"AMQP URL|amqp://"):
        split_amqp_urls(value)


def test_settings_keep_one_url_as_it_is_and_normalise_a_list(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFTERSALES_AMQP_URL", NODES[0])
    assert load_settings().amqp_url == NODES[0]
    monkeypatch.setenv("AFTERSALES_AMQP_URL", " , ".join(NODES))
    assert load_settings().amqp_url == ",".join(NODES)


def test_a_bad_url_in_the_list_is_named_without_showing_credentials(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFTERSALES_AMQP_URL", f"{NODES[0]},http://user:secret@b/")
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert message.startswith("AFTERSALES_AMQP_URL:")
    assert "URL 2 of 2" in message
    assert "secret" not in message


def _hosts(params: list) -> list[tuple[str, int]]:
    return [(p.host, p.port) for p in params]


def test_connection_parameters_name_every_node_in_turn_from_a_random_start() -> None:
    expected = [("rabbit-0", 5672), ("rabbit-1", 5673), ("rabbit-2", 5671)]
    starts = set()
    # 40 draws: all three starts are seen but for a chance of 3 * (2/3)**40, about 2e-7.
    # (Each draw builds an amqps URL's TLS context: more draws only cost time.)
    for _ in range(40):
        hosts = _hosts(connection_parameters_list(",".join(NODES)))
        start = expected.index(hosts[0])
        assert hosts == expected[start:] + expected[:start]  # the others follow, in order
        starts.add(start)
    assert starts == {0, 1, 2}  # clients spread over the nodes
    params = connection_parameters_list(",".join(NODES))
    assert all(p.heartbeat for p in params)  # each node gets the project's own settings
    assert {p.virtual_host for p in params} == {"/", "aftersales"}


def test_the_dramatiq_broker_connects_to_any_node_of_the_list() -> None:
    broker = make_broker(",".join(NODES), "quorum")
    assert isinstance(broker, AftersalesBroker)
    assert sorted(_hosts(broker.parameters)) == [
        ("rabbit-0", 5672), ("rabbit-1", 5673), ("rabbit-2", 5671)]
    single = make_broker(NODES[1])
    assert _hosts(single.parameters) == [("rabbit-1", 5673)]


def test_quorum_work_queues_dead_letter_after_a_delivery_limit() -> None:
    broker = make_broker(NODES[0], "quorum")
    arguments = broker._build_queue_arguments(RESOLVER_QUEUE)
    assert arguments["x-queue-type"] == "quorum"
    assert arguments["x-delivery-limit"] == DELIVERY_LIMIT
    assert arguments["x-dead-letter-routing-key"] == f"{RESOLVER_QUEUE}.XQ"
    assert arguments["x-dead-letter-strategy"] == "at-least-once"
    # Classic queues keep exactly the arguments they were declared with before.
    assert work_queue_arguments("classic", "x") == {}
    assert "x-queue-type" not in make_broker(NODES[0])._build_queue_arguments(RESOLVER_QUEUE)
