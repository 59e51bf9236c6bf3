"""Process trees: each service runs as a supervisor process with worker children.

The supervisor serves the service's /metrics (aggregating the children's
prometheus_client multiprocess files), /healthz and /readyz, restarts a child that dies,
and passes SIGTERM / SIGINT on for a clean stop: the children stop taking work and finish
or hand back what they hold; whatever is still running when the grace
(AFTERSALES_SHUTDOWN_GRACE_SECONDS, which the pod's terminationGracePeriodSeconds
matches) is nearly over is SIGKILLed, so the process tree is gone within the grace.
Children build their own connections after the fork.
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

from shared.health import Health
from shared.health import current as current_health

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    target: Callable[[], None]
    copies: int = 1


# Kept back from the grace for the supervisor's own exit after its children are gone.
EXIT_MARGIN_S = 1.0


def child_stop_budget(grace_s: float) -> float:
    """How long a child may take to finish what it holds once told to stop: inside the
    supervisor's wait, which is inside the grace."""
    return max(0.5, grace_s - EXIT_MARGIN_S - 1.0)


def supervise(specs: list[WorkerSpec], on_child_exit: Callable[[int], None] | None = None,
              *, grace_s: float = 15.0, health: Health | None = None) -> int:
    """Run the workers until SIGTERM/SIGINT; restart any that die. Returns an exit code.
    `health` (default: the one `/readyz` answers) hears about the workers."""
    health = health or current_health()
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
        health.workers(len(running), sum(p.is_alive() for p in running.values()))
        for key, proc in list(running.items()):
            if proc.is_alive() or stopping:
                continue
            if on_child_exit and proc.pid:
                on_child_exit(proc.pid)
            health.worker_restarted()
            log.error("%s exited with %s; restarting", proc.name, proc.exitcode)
            # Back off a little if a child keeps dying, so a crash loop does not spin.
            if time.monotonic() - restarts.get(key, 0.0) < 5:
                time.sleep(1.0)
            restarts[key] = time.monotonic()
            running[key] = start(specs[key[0]], key[1])
    stop_began = time.monotonic()
    health.stopping()  # unready at once: no new traffic while draining
    log.info("stopping: %d worker(s), grace %.0fs", len(running), grace_s)
    for proc in running.values():
        if proc.is_alive() and proc.pid:
            os.kill(proc.pid, signal.SIGTERM)
    deadline = stop_began + max(0.5, grace_s - EXIT_MARGIN_S)
    for proc in running.values():
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in running.values():
        if proc.is_alive():
            log.error("%s still running at the end of the grace: killed", proc.name)
            proc.kill()
            proc.join(1.0)
    log.info("stopped in %.1fs", time.monotonic() - stop_began)
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


def yield_cpu(niceness: int, autogroup: str = "/proc/self/autogroup") -> None:
    """Lower this process's CPU priority by `niceness`; the children it forks inherit it.

    Linux's autogroups (on by default) divide the CPU between sessions first and by
    niceness only within each. Every service started in a session of its own (honcho's
    `run all`, the benchmarks, the tests, a terminal each) would then get its full share
    whatever its niceness, so a session leader also gives its session's autogroup the same
    niceness. A process inside another's session (a shell's job) leaves that session's
    autogroup alone: it would lower the shell and whatever else runs there."""
    if niceness <= 0:
        return
    now = os.nice(niceness)
    if os.getsid(0) != os.getpid():
        log.info("niceness %d; not a session leader, so it counts only against processes "
                 "of the same session", now)
        return
    try:
        with open(autogroup, "w") as f:
            f.write(f"{now}\n")
    except FileNotFoundError:
        pass  # a kernel without autogroups: niceness alone decides
    except OSError as exc:  # e.g. a container, where the CPU weight does this instead
        log.info("niceness %d; the session's autogroup kept its own (%s)", now, exc)


def _stop_once(_signum: int, _frame: object) -> None:
    """The first SIGTERM interrupts the child's loop; later ones (the supervisor passing on
    a SIGTERM that the whole group also got) must not interrupt its clean-up."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _child_main(target: Callable[[], None], name: str) -> None:
    set_process_name(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    signal.signal(signal.SIGTERM, _stop_once)
    try:
        target()
    except KeyboardInterrupt:
        pass
