"""A RabbitMQ cluster of our own on this machine: N nodes of Debian's rabbitmq-server, each
with its own node name, AMQP and distribution ports, data and log folders, sharing an
Erlang cookie in a HOME of their own. The machine's own broker (rabbit@localhost on 5672)
is never touched: the nodes do not read /etc/rabbitmq, and every command names its node.

Used by the cluster test (tests/cluster/) and the cluster benchmark (bench/).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import wait_for
from tests.resources import free_port

SBIN = Path(os.environ.get("AFTERSALES_TEST_RABBITMQ_SBIN", "/usr/lib/rabbitmq/bin"))
USER, PASSWORD = "aftersales", "aftersales-cluster-test"  # a throwaway, local-only user
VHOST = "aftersales"
PARTITION_COOKIE = "aft18partition"

# What the deploy files use too: the minority side of a partition pauses (closes its
# client connections, so clients move to the majority) instead of serving stale state.
NODE_CONFIG = """\
listeners.tcp.1 = 127.0.0.1:{port}
cluster_partition_handling = pause_minority
loopback_users = none
disk_free_limit.absolute = 50MB
log.file.level = info
log.console = false
"""


class ClusterError(RuntimeError):
    """The cluster could not be started or commanded: the test must fail, not skip."""


@dataclass
class Node:
    name: str  # e.g. aft18-1a2b3c-1@localhost
    port: int  # AMQP
    dist_port: int  # Erlang distribution
    proc: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)


class RabbitCluster:
    def __init__(self, base: Path, size: int = 3) -> None:
        if not (SBIN / "rabbitmq-server").exists():
            raise ClusterError(f"{SBIN}/rabbitmq-server not found (Debian's rabbitmq-server)")
        self.base = base
        tag = secrets.token_hex(3)
        self.nodes = [Node(f"aft18-{tag}-{i}@localhost", free_port(), free_port())
                      for i in range(1, size + 1)]
        self.home = base / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("# empty: the nodes do not read /etc/rabbitmq\n")
        for node in self.nodes:
            (base / f"{self._short(node)}.conf").write_text(NODE_CONFIG.format(port=node.port))

    @staticmethod
    def _short(node: Node) -> str:
        return node.name.split("@")[0]

    def _env(self, node: Node) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(self.home),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / f"{self._short(node)}.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.base / f"{self._short(node)}.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    # Commands -------------------------------------------------------------------------
    def ctl(self, node: Node, *args: str, tool: str = "rabbitmqctl", timeout: float = 120,
            check: bool = True) -> str:
        proc = subprocess.run([str(SBIN / tool), "-q", "-n", node.name, *args],
                              env=self._env(node), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{tool} -n {node.name} {' '.join(args)}: "
                               f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc.stdout

    def _spawn(self, node: Node) -> None:
        node.starts += 1
        (self.base / "log").mkdir(exist_ok=True)
        out = open(self.base / "log" / f"{self._short(node)}.{node.starts}.out", "wb")
        node.proc = subprocess.Popen([str(SBIN / "rabbitmq-server")], env=self._env(node),
                                     cwd=self.base, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def _await_startup(self, node: Node, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if node.proc is not None and node.proc.poll() is not None:
                raise ClusterError(f"{node.name} exited with {node.proc.returncode}; see "
                                   f"{self.base / 'log'}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterError(f"{node.name} did not start within {timeout:.0f}s")
            try:
                self.ctl(node, "await_startup", "--timeout", str(int(max(left, 1))),
                         timeout=left + 10)
                return
            except (ClusterError, subprocess.TimeoutExpired):
                # The node's distribution is not up yet: the CLI cannot even reach it.
                time.sleep(0.5)

    def start(self) -> None:
        """Start every node, cluster them with the first, add the user and the vhost."""
        for node in self.nodes:
            self._spawn(node)
        for node in self.nodes:
            self._await_startup(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        running = self.running_nodes(first)
        if sorted(running) != sorted(n.name for n in self.nodes):
            raise ClusterError(f"cluster formed with {running} only")
        self.ctl(first, "add_user", USER, PASSWORD)
        self.ctl(first, "set_user_tags", USER, "administrator")
        self.ctl(first, "add_vhost", VHOST)
        self.ctl(first, "set_permissions", "-p", VHOST, USER, ".*", ".*", ".*")

    def reset_vhost(self) -> None:
        """An empty vhost again (queues declared with another type would clash)."""
        first = self.nodes[0]
        self.ctl(first, "delete_vhost", VHOST)
        self.ctl(first, "add_vhost", VHOST)
        self.ctl(first, "set_permissions", "-p", VHOST, USER, ".*", ".*", ".*")

    def running_nodes(self, via: Node) -> list[str]:
        out = self.ctl(via, "eval", "rabbit_nodes:all_running().")
        return [part.strip(" []'\n") for part in out.strip().strip("[]").split(",")
                if part.strip(" []'\n")]

    # Faults ---------------------------------------------------------------------------
    def stop_node(self, node: Node) -> None:
        """A clean stop of the whole node (as a rolling restart or a drained host)."""
        self.ctl(node, "stop")
        if node.proc is not None:
            node.proc.wait(timeout=60)

    def kill_node(self, node: Node) -> int:
        """kill -9 of this node's Erlang VM (beam.smp) only. Returns its pid."""
        pid = int(self.ctl(node, "eval", "list_to_integer(os:getpid()).").strip())
        os.kill(pid, signal.SIGKILL)
        if node.proc is not None:
            node.proc.wait(timeout=60)
        return pid

    def start_node(self, node: Node) -> None:
        """Start a stopped or killed node again; it rejoins the cluster by itself."""
        self._spawn(node)
        self._await_startup(node)

    def cut_off(self, node: Node) -> None:
        """Cut `node` off from the others' Erlang distribution (a network partition), until
        `heal`. No firewall (the loopback is shared): the node's cookie is changed, so the
        others can no longer connect to it nor it to them, and its links are dropped.
        RabbitMQ sees a partition; with pause_minority the cut-off node pauses (closes its
        listeners and client connections) until it sees the majority again."""
        others = [n for n in self.nodes if n is not node]
        cut = ", ".join(f"erlang:disconnect_node('{n.name}')" for n in others)
        self.ctl(node, "eval", f"erlang:set_cookie(node(), '{PARTITION_COOKIE}'), {cut}, ok.")

    def heal(self, node: Node) -> None:
        cookie = (self.home / ".erlang.cookie").read_text().strip()
        # The CLI must now present the node's changed cookie.
        proc = subprocess.run(
            [str(SBIN / "rabbitmqctl"), "-q", "-n", node.name, "--erlang-cookie",
             PARTITION_COOKIE, "eval", f"erlang:set_cookie(node(), '{cookie}'), ok."],
            env=self._env(node), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise ClusterError(f"healing the partition of {node.name}: {proc.stderr[-300:]}")

    def await_healthy(self, timeout: float = 180) -> None:
        """Every node running and in the cluster, and no node quorum-critical (each quorum
        queue has its members back, so another node may go)."""
        problem = wait_for(self.health_problem, timeout, interval=0.5,
                           until=lambda found: not found, or_last=True)
        if problem:
            raise ClusterError(f"cluster not healthy after {timeout:.0f}s: {problem}")

    def health_problem(self) -> str:
        """What keeps the cluster from being healthy ("" if nothing). Asked of every node in
        one `eval` (what `rabbitmq-diagnostics check_if_node_is_quorum_critical` asks, by
        rpc from one node): each CLI call starts an Erlang VM, and six of them per look
        made the wait for a node that came back several seconds longer than the node
        took."""
        names = sorted(n.name for n in self.nodes)
        want = "[" + ", ".join(f"'{name}'" for name in names) + "]"
        ask = f"""Want = {want},
            Check = fun(N) ->
                case rpc:call(N, rabbit_nodes, all_running, [], 15000) of
                    Running when is_list(Running) ->
                        case lists:sort(Running) of
                            Want ->
                                case rpc:call(N, rabbit_quorum_queue,
                                              list_with_minimum_quorum_for_cli, [], 15000) of
                                    [] -> ok;
                                    Critical when is_list(Critical) ->
                                        {{N, quorum_critical, length(Critical)}};
                                    Error -> {{N, Error}}
                                end;
                            Other -> {{N, sees, Other}}
                        end;
                    Error -> {{N, Error}}
                end
            end,
            [Problem || N <- Want, Problem <- [Check(N)], Problem =/= ok]."""
        problem = ""
        for via in self.nodes:  # the first node that answers
            try:
                out = self.ctl(via, "eval", ask, timeout=60).strip()
            except (ClusterError, subprocess.TimeoutExpired) as exc:
                problem = str(exc)
                continue
            return "" if out == "[]" else out
        return problem

    def replicas_in_step(self, queue: str) -> bool:
        """Every replica of a quorum queue is a leader or follower and has the same log
        (a node that came back has caught up with the others)."""
        import json

        out = self.ctl(self.nodes[0], "quorum_status", queue, "-p", VHOST, "--formatter",
                       "json", tool="rabbitmq-queues")
        members = json.loads(out)
        return len(members) == len(self.nodes) and all(
            m["Raft State"] in ("leader", "follower") for m in members) and len(
            {(m["Log Index"], m["Commit Index"]) for m in members}) == 1

    # URLs and clean-up ----------------------------------------------------------------
    def urls(self, nodes: list[Node] | None = None) -> str:
        """The comma-separated AMQP URL list the services are given."""
        return ",".join(f"amqp://{USER}:{PASSWORD}@127.0.0.1:{n.port}/{VHOST}"
                        for n in (nodes or self.nodes))

    def destroy(self) -> None:
        """Kill every node of ours and remove its data (the test's end, pass or fail)."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                try:
                    os.killpg(node.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                node.proc.wait(timeout=60)
        # Each node's erl_child_setup / inet_gethost helpers die with their VM.
        shutil.rmtree(self.base / "mnesia", ignore_errors=True)
