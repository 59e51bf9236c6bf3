"""A burst of large messages does not fill intake's memory: it holds at most prefetch x the
broker's message size limit of unacked data (AMQP has no prefetch by size; the settings
bound the product, see tests/deploy/test_intake_limits.py), rejects the oversized ones
without parsing them and goes on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.harness import rejected_messages
from tests.intake_service import intake_service, metric_sum, worker_pids
from tests.poison import Message, publish_messages

pytestmark = pytest.mark.integration

BODY_BYTES = 200 * 1024
BURST = 600  # 120 MB in all
PREFETCH = 20


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_burst_of_large_messages_is_rejected_within_a_bounded_memory(
    database_url: str, amqp_url: str, tmp_path: Path
) -> None:
    with intake_service(database_url, amqp_url, tmp_path,
                        intake_prefetch=str(PREFETCH)) as system:
        (pid,) = worker_pids(system)
        before = peak_rss_bytes(pid)
        burst = [Message(b'{"pad": "' + bytes([65 + i % 26]) * BODY_BYTES + b'"}')
                 for i in range(BURST)]
        publish_messages(amqp_url, burst)
        got: list[bytes] = []
        wait_for(lambda: got.extend(b for b, h in rejected_messages(amqp_url)
                                    if h["x-reject-reason"] == "oversized")
                 or len(got) >= BURST, timeout=120, what="every large message rejected")
        assert sorted(got) == sorted(m.body for m in burst)
        assert worker_pids(system) == {pid}
        # The counter is incremented after each copy is published and acked.
        wait_for(lambda: metric_sum(system, "aftersales_events_rejected_total",
                                    reason="oversized") >= BURST, what="every rejection counted")
        assert metric_sum(system, "aftersales_events_rejected_total",
                          reason="oversized") == BURST
        growth = peak_rss_bytes(pid) - before
    # Unacked data is at most PREFETCH x BODY_BYTES (4 MB) plus the copy being published;
    # reading the burst whole would take 120 MB.
    print(f"\n[memory] burst={BURST * BODY_BYTES / 2**20:.0f} MiB "
          f"peak RSS growth={growth / 2**20:.1f} MiB")
    assert growth < BURST * BODY_BYTES / 5
