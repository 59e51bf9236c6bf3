"""A single RabbitMQ node of a test's own (for killing it): its own node name, AMQP and
distribution ports, data and log folders, Erlang cookie and HOME. The machine's shared
broker (rabbit@localhost on 5672) is never touched: the node does not read /etc/rabbitmq
and every command names it. (The 3-node cluster harness is `tests/cluster/`.)"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

from tests.resources import free_port

SBIN = Path(os.environ.get("AFTERSALES_TEST_RABBITMQ_SBIN", "/usr/lib/rabbitmq/bin"))

CONFIG = """\
listeners.tcp.1 = 127.0.0.1:{port}
disk_free_limit.absolute = 50MB
log.console = false
"""


class RabbitNode:
    def __init__(self, base: Path) -> None:
        if not (SBIN / "rabbitmq-server").exists():
            raise AssertionError(f"{SBIN}/rabbitmq-server not found (Debian's rabbitmq-server)")
        self.base = base
        self.name = f"aft15-{secrets.token_hex(3)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.home = base / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("# empty: this node does not read /etc/rabbitmq\n")
        (base / "rabbitmq.conf").write_text(CONFIG.format(port=self.port))
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # the Erlang VM's
        self.starts = 0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(self.home),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.base / "node.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def ctl(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run([str(SBIN / "rabbitmqctl"), "-q", "-n", self.name, *args],
                              env=self._env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {proc.stderr.strip()[-300:]}")
        return proc.stdout

    def start(self, timeout: float = 180) -> None:
        self.starts += 1
        (self.base / "log").mkdir(exist_ok=True)
        out = open(self.base / "log" / f"server.{self.starts}.out", "wb")
        self.proc = subprocess.Popen([str(SBIN / "rabbitmq-server")], env=self._env(),
                                     cwd=self.base, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}; see "
                                     f"{self.base / 'log'}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name} did not start within {timeout:.0f}s")
            try:
                self.ctl("await_startup", "--timeout", str(int(max(left, 1))), timeout=left + 10)
                break
            except (RuntimeError, subprocess.TimeoutExpired):
                time.sleep(0.5)  # its distribution is not up yet
        self.pid = int(self.ctl("eval", "list_to_integer(os:getpid()).").strip())

    def kill9(self) -> None:
        """kill -9 of this node's Erlang VM, at once (its pid was read at start)."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=60)
        self.pid = None

    def stop(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
