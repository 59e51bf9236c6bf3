#!/usr/bin/env python
"""Where intake's time goes, statement by statement, on an empty database and on one with
a year of history (issue 19: intake's median at 500 events/s is higher on the history).

    .venv/bin/python bench/intake_sql_profile.py --scale 0.05   # 1/20 of a year of history

Two databases of the benchmark's own (bench/history_bench.py loads the history one), then
the same simulator traffic in batches of --batch events (what intake takes at 500 events/s
within its 50 ms batch window), processed in this process by intake's own
`IntakeProcessor`, alternately on each database. Every statement is timed at the driver
(SQLAlchemy's cursor events: sent until its result is back) and grouped by its first
words; the rest of a batch's time is Python. Prints, per statement, the calls and the
milliseconds per batch on each database, and the batch time's p50/p99; a final `RESULT`
line; writes bench-results/intake_sql_profile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH_DIR))

import history_bench as hb  # noqa: E402
import timer_bench as tb  # noqa: E402
from sqlalchemy import event  # noqa: E402

from aftersales_cli.simulate.generator import SimConfig, generate  # noqa: E402
from services.intake.processor import IntakeProcessor  # noqa: E402
from shared.db.session import Database, make_engine  # noqa: E402
from shared.domain import Engine, RuleBook, WorkCalendar  # noqa: E402
from shared.notifications.policy import NotificationPolicy  # noqa: E402

OUT = ROOT / "bench-results" / "intake_sql_profile.json"
_WORDS = re.compile(r"\s+")


def statement_key(sql: str) -> str:
    """A statement's group: its first words and the tables it names (bind values vary)."""
    flat = _WORDS.sub(" ", sql).strip()
    head = " ".join(flat.split(" ")[:3])
    tables = sorted(set(re.findall(r"(?:FROM|INTO|UPDATE|JOIN) ([a-z_]+)", flat)))
    return f"{head} [{', '.join(tables)}]"[:90]


class StatementTimer:
    """Milliseconds and calls per statement group, from the engine's cursor events."""

    def __init__(self, engine: Any) -> None:
        self.ms: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, cursor: Any, statement: str, parameters: Any,
                context: Any, executemany: bool) -> None:
        conn.info.setdefault("_t0", []).append(time.perf_counter())

    def _after(self, conn: Any, cursor: Any, statement: str, parameters: Any,
               context: Any, executemany: bool) -> None:
        elapsed = time.perf_counter() - conn.info["_t0"].pop()
        key = statement_key(statement)
        self.ms[key] += elapsed * 1000
        self.calls[key] += 1

    def reset(self) -> None:
        self.ms.clear()
        self.calls.clear()


@contextmanager
def processor_on(url: str) -> Iterator[tuple[IntakeProcessor, StatementTimer]]:
    sql_engine = make_engine(url)
    timer = StatementTimer(sql_engine)
    try:
        yield IntakeProcessor(
            db=Database(sql_engine), engine=Engine(RuleBook.load(None), WorkCalendar(None)),
            policy=NotificationPolicy.load(None),
            ops_contacts={"emails": ["ops@example.com"], "phones": []},
            max_event_bytes=64 * 1024), timer
    finally:
        sql_engine.dispose()


def run(url: str, bodies: list[bytes], batch: int) -> dict[str, Any]:
    with processor_on(url) as (processor, timer):
        processor.process(bodies[:batch])  # connections opened, statements prepared
        timer.reset()
        times = []
        for i in range(batch, len(bodies), batch):
            t0 = time.perf_counter()
            result = processor.process(bodies[i:i + batch])
            times.append((time.perf_counter() - t0) * 1000)
            if result.rejected:
                raise RuntimeError(f"rejected: {result.rejected[:3]}")
        batches = len(times)
        return {"batches": batches, "p50_ms": statistics.median(times),
                "p99_ms": sorted(times)[int(0.99 * (batches - 1))],
                "mean_ms": statistics.fmean(times),
                "sql_ms_per_batch": {k: v / batches for k, v in timer.ms.items()},
                "calls_per_batch": {k: n / batches for k, n in timer.calls.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--events", type=int, default=5000, help="per database and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    pid = os.getpid()
    boxes = {"empty": tb.Sandbox(f"{pid}_pe"), "history": tb.Sandbox(f"{pid}_ph")}
    result: dict[str, Any] = {"scale": args.scale, "batch": args.batch,
                              "events": args.events, "machine": tb.machine()}
    try:
        for box in boxes.values():
            box.create()
        result["history_load"] = hb.load_history(
            boxes["history"], max(1, int(hb.FULL_FINISHED * args.scale)),
            max(1, int(hb.FULL_OPEN * args.scale)))
        for r in range(args.rounds):
            labels = ("empty", "history") if r % 2 == 0 else ("history", "empty")
            for label in labels:
                cfg = SimConfig(rate=500.0, duplicate_share=0.0, malformed_share=0.0,
                                run_id=f"pf{pid}r{r}")
                bodies = [m.body for m in generate(cfg, args.events, seed=r, rate=500.0)]
                hb.checkpoint(boxes[label])
                hb.log(f"round {r + 1}: {label}")
                result.setdefault(label, []).append(run(boxes[label].sa_url, bodies,
                                                        args.batch))
    finally:
        for box in boxes.values():
            box.drop()
    keys = sorted({k for label in ("empty", "history") for rnd in result[label]
                   for k in rnd["sql_ms_per_batch"]},
                  key=lambda k: -sum(rnd["sql_ms_per_batch"].get(k, 0)
                                     for rnd in result["history"]))

    def med(label: str, field: str, key: str | None = None) -> float:
        values = [rnd[field] if key is None else rnd[field].get(key, 0.0)
                  for rnd in result[label]]
        return statistics.median(values)

    print(f"\n{'statement (ms per batch of ' + str(args.batch) + ')':<92} "
          f"{'calls':>6} {'empty':>7} {'history':>8}")
    for key in keys:
        print(f"{key:<92} {med('history', 'calls_per_batch', key):>6.1f} "
              f"{med('empty', 'sql_ms_per_batch', key):>7.2f} "
              f"{med('history', 'sql_ms_per_batch', key):>8.2f}")
    sql = {label: sum(med(label, "sql_ms_per_batch", k) for k in keys)
           for label in ("empty", "history")}
    for label in ("empty", "history"):
        print(f"{label:>8}: batch p50 {med(label, 'p50_ms'):.1f} ms, p99 "
              f"{med(label, 'p99_ms'):.1f} ms, mean {med(label, 'mean_ms'):.1f} ms, "
              f"of it SQL {sql[label]:.1f} ms")
    result["result_line"] = (
        f"RESULT intake_sql_profile scale={args.scale} batch={args.batch} "
        f"batch_p50_ms={med('empty', 'p50_ms'):.1f}/{med('history', 'p50_ms'):.1f} "
        f"batch_mean_ms={med('empty', 'mean_ms'):.1f}/{med('history', 'mean_ms'):.1f} "
        f"sql_ms={sql['empty']:.1f}/{sql['history']:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(result["result_line"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
