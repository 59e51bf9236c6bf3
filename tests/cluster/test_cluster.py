"""The system on a three-node RabbitMQ cluster, with quorum queues and two copies of each
service, under faults (issue 18).

Starts three RabbitMQ nodes of its own on this machine, runs intake, timer, resolver,
notifier and the platform gateway twice each and the ops console once as processes against
the node list, and publishes simulated traffic (and pushes signed Douyin batches through
both gateway copies, sent again as the platform does until it gets the success body) from
before the first fault to after the last while, at random moments and in a random
order: one node is stopped and started again, one is killed with `kill -9` and started
again, one is cut off from the others (a network partition: its Erlang cookie is changed
and its links dropped; no firewall on the shared loopback), and one timer and one resolver
are killed for good, and one gateway is killed (and started again once a batch has had
to go again). Each node that goes is the one most service copies are connected to; while
it is away, every copy must connect to another node by itself (seen in the kernel's socket
table), and it comes back only then. At the end it checks what a user would:
- every accepted event is in its case log once; each Douyin message applied exactly once;
- every due deadline fired and made exactly one decision, which reached a queue bound to
  `aftersales.decisions` exactly once;
- no notification was sent twice;
- every queue of the system is a quorum queue with a replica on each node;
- the console's overview answers, with the held counts read from the cluster, after the
  faults and at the end.
A `[cluster report]` line with the counts is printed before the assertions.
Fails, never skips, when the cluster cannot be started.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from aftersales_cli.simulate.generator import SimConfig, generate
from shared.amqp import (
    INTAKE_QUEUE,
    NOTIFIER_QUEUE,
    OUTBOX_LEDGER_QUEUE,
    REJECTED_QUEUE,
    RESOLVER_QUEUE,
    UNROUTED_QUEUE,
)
from shared.db.session import Database
from tests.cluster.rabbit_cluster import VHOST, RabbitCluster
from tests.cluster.scenario import (
    TAP_QUEUE,
    ClusterTap,
    Published,
    Pushed,
    await_clients_moved,
    await_quiet,
    client_nodes,
    gateway_event_counts,
    judge,
    publish_paced,
    push_douyin_paced,
    service_env,
)
from tests.conftest import wait_for
from tests.harness import Console, Gateway, System

pytestmark = pytest.mark.cluster

COPIES = 2
RATE = 50.0  # offered events per second, from before the first fault until after the last
MESSAGES = int(RATE * 600)  # more than enough: publishing stops once the faults are done
SERVICES = ("intake", "timer", "resolver", "notifier")
# Douyin pushes through the gateway copies, alongside the simulated traffic.
PUSH_BATCHES_PER_SECOND = 2.0
PUSH_BATCH = 8


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RabbitCluster]:
    cluster = RabbitCluster(tmp_path / "rabbitmq")
    try:
        cluster.start()  # raises ClusterError: the test fails, it does not skip
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def services(cluster: RabbitCluster, database_url: str, db: Database, redis_prefix: str,
             tmp_path: Path) -> Iterator[System]:
    log_dir = tmp_path / "services"
    log_dir.mkdir()
    system = System(service_env(database_url, cluster.urls(), redis_prefix), log_dir,
                    copies=COPIES)
    system.start(*system.ports)
    try:
        for name in system.ports:
            wait_for(lambda n=name: system.metrics_ready(n), timeout=120,
                     what=f"{name} to serve metrics")
        yield system
    finally:
        system.stop()


@pytest.fixture
def gateways(cluster: RabbitCluster, services: System, tmp_path: Path) -> Iterator[list[Gateway]]:
    """Two copies of the platform gateway against the node list (as behind an ingress)."""
    copies: list[Gateway] = []
    try:
        for i in range(1, COPIES + 1):
            log_dir = tmp_path / f"gateway.{i}"
            log_dir.mkdir()
            copies.append(Gateway(services.env, log_dir))
            copies[-1].start()
        yield copies
    finally:
        for gateway in copies:
            if gateway.proc is not None:
                gateway.kill(signal.SIGTERM)


@pytest.fixture
def console(services: System, tmp_path: Path) -> Iterator[Console]:
    """The ops console against the node list."""
    console = Console(services.env, tmp_path)
    try:
        console.start()
        yield console
    finally:
        console.stop()


def _console_overview_ok(console: Console) -> bool:
    """The overview answers, with the held counts read from the cluster."""
    page = console.get("/")
    return page.status_code == 200 and 'id="rejected"' in page.text


def _queues(cluster: RabbitCluster) -> dict[str, tuple[str, int]]:
    """Every queue of the vhost: its type and on how many nodes it has a replica."""
    out = cluster.ctl(cluster.nodes[0], "list_queues", "-p", VHOST, "--no-table-headers",
                      "name", "type", "members")
    queues = {}
    for line in out.strip().splitlines():
        name, kind, members = line.split("\t")[:3]
        queues[name] = (kind, sum(members.count(n.name) for n in cluster.nodes))
    return queues


@pytest.mark.timeout(900)
def test_cluster_with_two_copies_survives_node_losses_partition_and_kills(
    cluster: RabbitCluster, services: System, gateways: list[Gateway], console: Console,
    db: Database
) -> None:
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    config = SimConfig(rate=RATE, duration=None, count=MESSAGES, deadline_seconds=8,
                       late_merchant_share=0.4, late_buyer_share=0.3, duplicate_share=0.05,
                       malformed_share=0.0, run_id=f"cl{uuid.uuid4().hex[:6]}")
    messages = list(generate(config, MESSAGES, seed=seed, start=datetime.now(UTC)))

    kills: Counter[str] = Counter()
    moved_copies = 0  # service copies connected to a lost node that moved to another
    node_losses: Counter[str] = Counter()
    timeline: list[str] = []
    started = time.monotonic()

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - started:.0f}s {what}")

    with ClusterTap(cluster.urls()) as tap:
        published: list[Published] = []
        stop_traffic = threading.Event()
        publisher = threading.Thread(target=lambda: published.append(publish_paced(
            cluster.urls(), [m.body for m in messages], RATE, stop_traffic)))
        publisher.start()
        pushed: list[Pushed] = []
        pushing = Pushed()  # filled in as the pushes go
        pusher = threading.Thread(target=lambda: pushed.append(push_douyin_paced(
            gateways, config.run_id, PUSH_BATCHES_PER_SECOND, PUSH_BATCH, stop_traffic,
            first_aftersale_id=rng.randrange(10**9, 2 * 10**9), result=pushing)),
            daemon=True)
        pusher.start()
        faults = ["stop", "kill -9", "partition", "timer", "resolver", "gateway"]
        rng.shuffle(faults)
        for fault in faults:
            time.sleep(rng.uniform(1.0, 5.0))  # a random moment, not a condition to await
            if fault == "gateway":
                # Killed mid-traffic and started again: the platform's batches that it
                # did not answer go again (to the other copy, or to it once it is back).
                victim_gateway = gateways[rng.randrange(COPIES)]
                retries_before = pushing.retries
                victim_gateway.kill()
                kills[fault] += 1
                note(f"killed gateway on port {victim_gateway.port}")
                # Down until the platform noticed: a batch to it failed and went again.
                wait_for(lambda r=retries_before: pushing.retries > r, timeout=60,
                         interval=0.1, what="a Douyin batch sent again after the kill")
                victim_gateway.start()
                note("gateway back")
                continue
            if fault in ("timer", "resolver"):
                victim = f"{fault}.{rng.randint(1, COPIES)}"
                services.kill(victim)  # for good: the other copy carries on alone
                kills[fault] += 1
                note(f"killed {victim}")
                continue
            # The node most service copies are connected to (ties: at random).
            before = client_nodes(services, cluster.nodes)
            on_node = Counter(n for names in before.values() for n in names)
            node = max(rng.sample(cluster.nodes, len(cluster.nodes)),
                       key=lambda n: on_node[n.name])
            note(f"{fault} {node.name} ({on_node[node.name]} copies on it)")
            if fault == "partition":
                cluster.cut_off(node)
            else:
                (cluster.stop_node if fault == "stop" else cluster.kill_node)(node)
            # While it is away, every copy finds another node by itself.
            after = await_clients_moved(services, cluster.nodes, node, before)
            moved_copies += sum(1 for name, names in before.items()
                                if node.name in names and after.get(name))
            note(f"clients moved off {node.name}")
            time.sleep(rng.uniform(1.0, 4.0))  # how much longer the node stays away
            if fault == "partition":
                cluster.heal(node)
            else:
                cluster.start_node(node)
            node_losses[fault] += 1
            cluster.await_healthy()  # back, caught up: another node may go
            note(f"{node.name} back")
        time.sleep(rng.uniform(1.0, 3.0))  # traffic goes on a little after the last fault
        stop_traffic.set()
        publisher.join(600)
        pusher.join(600)
        assert published, "the publisher failed (see its traceback above)"
        assert pushed, "the Douyin pushes failed (see the traceback above)"
        note("traffic published")
        console_ok_after_faults = _console_overview_ok(console)
        pushed_ids = {f"douyin-{msg_id}" for msg_id in pushed[0].msg_ids}
        good_ids = {m.event["event_id"] for m in messages[:published[0].count]
                    if m.event is not None} | pushed_ids
        settled = await_quiet(db, good_ids, tap)
        wire = tap.catch_up()
        # The nodes that came back caught up: the busiest queues' replicas are in step.
        busiest = (INTAKE_QUEUE, RESOLVER_QUEUE, NOTIFIER_QUEUE, TAP_QUEUE)
        wait_for(lambda: all(cluster.replicas_in_step(q) for q in busiest), timeout=180,
                 interval=1.0, what="every replica of the busiest queues in step")
        note("replicas in step")
        note("quiet")
        redelivered_to_tap = tap.redelivered

    result = judge(db, good_ids, settled, wire, lambda: services.log("notifier"))
    gateway_rows = gateway_event_counts(db, config.run_id)
    gateway_applied = {event_id for (event_id, outcome), n in gateway_rows.items()
                       if outcome == "applied" and n == 1}
    console_ok_at_end = _console_overview_ok(console)
    queues = _queues(cluster)
    ours = {INTAKE_QUEUE, REJECTED_QUEUE, UNROUTED_QUEUE, OUTBOX_LEDGER_QUEUE, TAP_QUEUE} | {
        f"{q}{suffix}" for q in (RESOLVER_QUEUE, NOTIFIER_QUEUE) for suffix in ("", ".DQ", ".XQ")}
    survivors = [n for n in services.procs if n.split(".")[0] in ("timer", "resolver")]
    # Connections of the services that a node loss broke (each then went to another node).
    connections_lost = sum(services.log(s).count("Unexpected connection close detected")
                           for s in SERVICES)
    print(f"\n[cluster report] seed={seed} nodes={len(cluster.nodes)} copies={COPIES} "
          f"messages={published[0].count} events={result.events} "
          f"republished_chunks={published[0].republished_chunks} "
          f"kills={dict(kills)} node_losses={dict(node_losses)} "
          f"client_connections_lost={connections_lost} copies_moved={moved_copies} "
          f"deadlines_fired={result.deadlines_fired} decisions={result.decisions} "
          f"decisions_on_wire={sum(wire.values())} tap_redeliveries={redelivered_to_tap} "
          f"notifications_sent={result.notifications_sent} "
          f"gateway_messages_sent={len(pushed_ids)} gateway_batches={pushed[0].batches} "
          f"gateway_applied={len(gateway_applied)} gateway_retries={pushed[0].retries} "
          f"gateway_failed_answers={dict(pushed[0].failed_answers)} "
          f"console_overview_ok=({console_ok_after_faults}, {console_ok_at_end}) "
          f"lost_events={result.lost_events} lost_decisions={result.lost_decisions} "
          f"duplicated_decisions={result.duplicated_decisions} "
          f"wrong_decisions={result.wrong_decisions} "
          f"duplicated_notifications={result.duplicated_notifications} "
          f"lost_notifications={result.lost_notifications} "
          f"sent_but_recorded_unknown={result.sent_but_recorded_unknown} "
          f"sent_but_recorded_wrong={result.sent_but_recorded_wrong} "
          f"queues(type, replicas)={sorted(set(queues.values()))} details={result.details}")
    print("[cluster timeline] " + "; ".join(timeline))
    assert result.lost_events == 0
    assert result.lost_decisions == 0
    assert result.duplicated_decisions == 0
    assert result.wrong_decisions == 0
    assert result.duplicated_notifications == 0
    assert result.lost_notifications == 0
    # A send whose worker could not record it may stay "unknown" (never sent twice, and
    # visible to ops); recorded as anything else, the record would be wrong.
    assert result.sent_but_recorded_wrong == 0, result.details
    # Each message pushed through the gateways applied exactly once, nothing else logged.
    assert gateway_applied == pushed_ids and set(gateway_rows) == {
        (event_id, "applied") for event_id in pushed_ids}, gateway_rows - Counter(
        {(event_id, "applied"): 1 for event_id in pushed_ids})
    assert console_ok_after_faults and console_ok_at_end, "the console's overview failed"
    # Every queue is a quorum queue with a replica on each node.
    assert set(queues) == ours and set(queues.values()) == {("quorum", 3)}, queues
    assert node_losses == Counter({"stop": 1, "kill -9": 1, "partition": 1})
    assert kills == Counter({"timer": 1, "resolver": 1, "gateway": 1})
    # One copy of each left, and it did the rest alone.
    assert sorted(n.split(".")[0] for n in survivors) == ["resolver", "timer"], survivors
    assert connections_lost > 0 and moved_copies > 0, \
        "no service connection was hit by the node losses"
    # The traffic exercised what it should have: deadlines fired, notifications went out.
    assert result.deadlines_fired > 100
    assert result.notifications_sent > 0
    assert len(pushed_ids) > 100
    assert pushed[0].retries > 0, "no Douyin batch had to be sent again"
