#!/usr/bin/env python
"""CPU cost of intake's input checks (`parse_event`) per event, in one process.

    .venv/bin/python bench/parse_profile.py [--events N] [--rounds N]

Generates simulator traffic (well-formed events only) and times `parse_event` over it,
beside a baseline measured in the same run on the same bodies: `json.loads` alone, the
least any check of a JSON body costs. Prints microseconds per event for both (the median
of the rounds) and their ratio. Against an older commit, run the same file from a worktree
of it: `cd /tmp/old && /path/to/.venv/bin/python bench/parse_profile.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aftersales_cli.simulate.generator import SimConfig, generate  # noqa: E402
from shared.schemas.events import Accepted, parse_event  # noqa: E402


def per_event_us(bodies: list[bytes], check: Callable[[bytes], object], rounds: int) -> float:
    def one_round() -> float:
        started = time.perf_counter()
        for body in bodies:
            check(body)
        return (time.perf_counter() - started) / len(bodies) * 1e6

    one_round()  # warm up
    return statistics.median(one_round() for _ in range(rounds))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    bodies = [m.body for m in generate(SimConfig(count=args.events, duration=None),
                                       args.events, seed=7) if m.category == "event"]
    assert all(isinstance(parse_event(b), Accepted) for b in bodies)
    # Interleaved, so a change in the machine's speed touches both alike.
    floor, parse = [], []
    for _ in range(args.rounds):
        floor.append(per_event_us(bodies, json.loads, 1))
        parse.append(per_event_us(bodies, parse_event, 1))
    floor_us, parse_us = statistics.median(floor), statistics.median(parse)
    print(json.dumps({"events": len(bodies), "rounds": args.rounds,
                      "json_loads_us": round(floor_us, 1),
                      "parse_event_us": round(parse_us, 1),
                      "ratio": round(parse_us / floor_us, 1)}))


if __name__ == "__main__":
    main()
