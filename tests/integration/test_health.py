"""`/healthz` and `/readyz` of a real supervisor process tree: ready when its workers are
up and its dependencies answer; unready when a worker crash-loops or PostgreSQL is down;
the metrics port is not reachable on a non-loopback address unless a setting opens it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import wait_for
from tests.harness import ROOT, process_group_members
from tests.resources import free_port

pytestmark = pytest.mark.integration

SUPERVISED = """
import os, sys, time
from shared import metrics
from shared.health import Health, install
from shared.runtime import WorkerSpec, supervise

kind, port = sys.argv[1], int(sys.argv[2])

def crash():
    os._exit(3)

def work():
    while True:
        time.sleep(1)

install(Health())
metrics.start_metrics_server(port, "intake")
supervise([WorkerSpec("w", crash if kind == "crash" else work, 2)], grace_s=4)
"""


def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def run_supervised(kind: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", SUPERVISED, kind, str(port)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.fixture
def stop_after() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_ready_with_workers_up_then_exits_within_the_grace(
    stop_after: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    proc = run_supervised("work", port)
    stop_after.append(proc)
    wait_for(lambda: get(port, "/readyz") == (200, "ready\n"), timeout=30,
             what="the workers to be up")
    assert get(port, "/healthz")[0] == 200
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # to the supervisor only, as a container runtime does
    proc.wait(30)
    took = time.monotonic() - started
    assert took < 4, took  # AFTERSALES_SHUTDOWN_GRACE_SECONDS given as 4
    assert process_group_members(proc.pid) == []


def test_unready_while_a_worker_crash_loops(
    stop_after: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    proc = run_supervised("crash", port)
    stop_after.append(proc)
    wait_for(lambda: (r := get(port, "/readyz"))[0] == 503 and "crash-looping" in r[1],
             timeout=60, what="/readyz to report the crash loop")
    assert get(port, "/healthz")[0] == 200  # alive: a restart of the pod would not help


def test_unready_while_postgresql_is_down(tmp_path: object) -> None:
    """The real timer service with its database URL on a port where nothing listens."""
    port, dead = free_port(), free_port()
    env = {**os.environ, "AFTERSALES_DATABASE_URL": f"postgresql+psycopg://127.0.0.1:{dead}/x",
           "AFTERSALES_METRICS_PORT": str(port), "AFTERSALES_SHUTDOWN_GRACE_SECONDS": "4"}
    proc = subprocess.Popen([sys.executable, "-m", "aftersales_cli.cli", "run", "timer"], cwd=ROOT,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (r := get(port, "/readyz"))[0] == 503
                 and "postgresql unreachable" in r[1], timeout=60,
                 what="/readyz to report PostgreSQL down")
        assert get(port, "/healthz")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def non_loopback_address() -> str:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True,
                         timeout=10).stdout.split()
    addresses = [a for a in out if ":" not in a and not a.startswith("127.")]
    assert addresses, "this machine has no non-loopback IPv4 address to test with"
    return addresses[0]


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("bind", [None, "0.0.0.0"])
def test_metrics_listen_on_loopback_unless_a_setting_opens_them(bind: str | None) -> None:
    port = free_port()
    env = {**os.environ, "AFTERSALES_METRICS_PORT": str(port),
           "AFTERSALES_SHUTDOWN_GRACE_SECONDS": "4"}
    env.pop("AFTERSALES_METRICS_BIND", None)
    if bind:
        env["AFTERSALES_METRICS_BIND"] = bind
    proc = subprocess.Popen([sys.executable, "-m", "aftersales_cli.cli", "run", "timer"], cwd=ROOT,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: get(port, "/healthz")[0] == 200, timeout=60, what="the timer")
        # Only our own port on this machine's own address.
        assert reachable(non_loopback_address(), port) == (bind == "0.0.0.0")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
