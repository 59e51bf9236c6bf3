"""Process trees: each service runs as a supervisor process with worker children.

The supervisor serves the service's /metrics (aggregating the children's
prometheus_client multiprocess files), restarts a child that dies, and passes SIGTERM /
SIGINT on for a clean stop. Children build their own connections after the fork.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    target: Callable[[], None]
    copies: int = 1


def supervise(specs: list[WorkerSpec], on_child_exit: Callable[[int], None] | None = None) -> int:
    """Run the workers until SIGTERM/SIGINT; restart any that die. Returns an exit code."""
    ctx = mp.get_context("fork")
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    def start(spec: WorkerSpec, index: int) -> BaseProcess:
        proc = ctx.Process(target=_child_main, args=(spec.target, spec.name),
                           name=f"{spec.name}-{index}")
        proc.start()
        log.info("started %s (pid %s)", proc.name, proc.pid)
        return proc

    running: dict[tuple[int, int], BaseProcess] = {}
    for s_index, spec in enumerate(specs):
        for index in range(spec.copies):
            running[(s_index, index)] = start(spec, index)
    restarts: dict[tuple[int, int], float] = {}
    while not stopping:
        time.sleep(0.2)
        for key, proc in list(running.items()):
            if proc.is_alive() or stopping:
                continue
            if on_child_exit and proc.pid:
                on_child_exit(proc.pid)
            log.error("%s exited with %s; restarting", proc.name, proc.exitcode)
            # Back off a little if a child keeps dying, so a crash loop does not spin.
            if time.monotonic() - restarts.get(key, 0.0) < 5:
                time.sleep(1.0)
            restarts[key] = time.monotonic()
            running[key] = start(specs[key[0]], key[1])
    for proc in running.values():
        if proc.is_alive() and proc.pid:
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for proc in running.values():
        proc.join(max(0.1, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
    return 0


def poll_loop(what: str, step: Callable[[], int], *, idle_seconds: float, full: int) -> None:
    """Call `step` forever. It returns how much work it did: less than `full` means
    caught up, so wait `idle_seconds`; an exception (database or broker away) is logged
    and retried with a capped backoff: whatever the step claimed stays in PostgreSQL."""
    backoff = idle_seconds
    while True:
        try:
            done = step()
        except Exception as exc:
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__,
                        exc, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            continue
        backoff = idle_seconds
        if done < full:
            time.sleep(idle_seconds)


def set_process_name(name: str) -> None:
    """Show the worker's role in `ps`/`top` (Linux comm, 15 bytes), e.g. `as-outbox`."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, f"as-{name}".encode()[:15], 0, 0, 0)  # 15 = PR_SET_NAME
    except (OSError, AttributeError):
        pass  # not Linux: names are cosmetic


def _child_main(target: Callable[[], None], name: str) -> None:
    set_process_name(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        target()
    except KeyboardInterrupt:
        pass
