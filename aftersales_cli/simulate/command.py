"""`aftersales simulate`: its options, and the run (generate, pace, publish or print)."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

from aftersales_cli.simulate.generator import (
    DEFAULT_MIX,
    DEFAULT_PLATFORMS,
    PacedFeed,
    SimConfig,
    Summary,
    TrafficGenerator,
    parse_mix,
)
from aftersales_cli.simulate.publisher import ConfirmedStreamPublisher


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `aftersales simulate` options (adds to or replaces --rate/--duration/--seed)."""
    existing = {a for action in parser._actions for a in action.option_strings}

    def add(*names: str, **kwargs: Any) -> None:
        if not existing.intersection(names):
            parser.add_argument(*names, **kwargs)

    add("--rate", type=float, default=50.0,
        help="messages per second, all kinds together (default 50; 0 = as fast as possible)")
    add("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    add("--count", type=int, default=None,
        help="stop after this many messages instead of after --duration")
    add("--seed", type=int, default=None, help="random seed (the same seed, the same traffic)")
    add("--platforms", default=",".join(DEFAULT_PLATFORMS),
        help="comma-separated platforms (default kuaishou,douyin,taobao)")
    add("--mix", default=",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items()),
        help="kind weights, e.g. exchange=2,refund_only=5 (kinds not named are not generated)")
    add("--late-merchant-share", type=_share, default=0.15,
        help="share of cases whose merchant misses the response deadline (default 0.15)")
    add("--late-buyer-share", type=_share, default=0.10,
        help="share of cases whose buyer ships late or never confirms (default 0.10)")
    add("--duplicate-share", type=_share, default=0.02,
        help="share of messages that re-send an earlier event unchanged (default 0.02)")
    add("--malformed-share", type=_share, default=0.01,
        help="share of malformed messages: bad JSON, missing field, unknown type, not UTF-8, "
             "bad data (default 0.01)")
    add("--intervention-share", type=_share, default=0.05,
        help="share of cases in which the buyer asks the platform to intervene (default 0.05)")
    add("--rejection-share", type=_share, default=0.10,
        help="share of cases the merchant rejects (default 0.10)")
    add("--deadline-seconds", type=float, default=None,
        help="put the platform deadline due_at = now + N s on events, so missed deadlines "
             "fire within the demo (default: the rule sets' deadlines, hours to days)")
    add("--think-seconds", type=float, default=2.0,
        help="on-time parties act within this many seconds (default 2)")
    add("--run-id", default="", help="prefix of case and event ids (default: time-based)")
    add("--summary", default=None, metavar="FILE", help="write the summary as JSON to FILE")
    add("--dry-run", action="store_true",
        help="print the messages as JSON lines to stdout instead of publishing")
    add("--window", type=int, default=2000,
        help="published messages awaiting their confirm at most (default 2000)")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    def opt(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    count = opt("count", None)
    duration = opt("duration", 60.0)
    platforms = tuple(p.strip() for p in str(opt("platforms", ",".join(DEFAULT_PLATFORMS)))
                      .split(",") if p.strip())
    mix_text = opt("mix", None)
    return SimConfig(
        rate=float(opt("rate", 50.0)),
        duration=None if count is not None and getattr(args, "duration", None) in (None, 60.0)
        else float(duration),
        count=count,
        platforms=platforms or DEFAULT_PLATFORMS,
        mix=parse_mix(mix_text) if mix_text else dict(DEFAULT_MIX),
        late_merchant_share=float(opt("late_merchant_share", 0.15)),
        late_buyer_share=float(opt("late_buyer_share", 0.10)),
        duplicate_share=float(opt("duplicate_share", 0.02)),
        malformed_share=float(opt("malformed_share", 0.01)),
        intervention_share=float(opt("intervention_share", 0.05)),
        rejection_share=float(opt("rejection_share", 0.10)),
        deadline_seconds=opt("deadline_seconds", None),
        think_seconds=float(opt("think_seconds", 2.0)),
        run_id=str(opt("run_id", "")),
    )


def _progress_line(summary: Summary, elapsed: float, confirmed: int, final: bool = False) -> str:
    rate = summary.sent / elapsed if elapsed > 0 else 0.0
    return (f"simulate: {'done' if final else 'sent'} {summary.sent} ({rate:,.0f}/s) "
            f"confirmed {confirmed} duplicates {summary.duplicates} "
            f"malformed {summary.malformed} cases {sum(summary.cases_by_kind.values())} "
            f"elapsed {elapsed:.1f}s")


def run_simulation(settings: Any, args: argparse.Namespace) -> int:
    import re

    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"aftersales simulate: {exc}", file=sys.stderr)
        return 2
    bad = [p for p in cfg.platforms if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", p)]
    if bad:
        print(f"aftersales simulate: bad platform name {bad[0]!r}", file=sys.stderr)
        return 2
    if cfg.rate < 0 or (cfg.duration is None and cfg.count is None):
        print("aftersales simulate: --rate must be >= 0 and --duration or --count given",
              file=sys.stderr)
        return 2
    seed = getattr(args, "seed", None)
    gen = TrafficGenerator(cfg, random.Random(seed))
    feed = PacedFeed(gen, cfg.rate, cfg.duration, cfg.count)
    summary = gen.summary
    if getattr(args, "dry_run", False):
        out = sys.stdout.buffer
        last = 0.0
        while (batch := feed(500)) is not None:
            for msg in batch:
                out.write(msg.body + b"\n")
            t = feed.elapsed()
            if t - last >= 1.0:
                last = t
                print(_progress_line(summary, t, 0), file=sys.stderr)
            if not batch:
                time.sleep(0.002)
        out.flush()
        summary.elapsed = feed.elapsed()
    else:
        def tick(pub: ConfirmedStreamPublisher) -> None:
            print(_progress_line(summary, feed.elapsed(), pub.confirmed), file=sys.stderr,
                  flush=True)

        publisher = ConfirmedStreamPublisher(settings.amqp_url,
                                             window=int(getattr(args, "window", 2000) or 2000),
                                             queue_type=getattr(settings, "queue_type",
                                                                "classic"),
                                             on_tick=tick)
        try:
            publisher.run(feed)
        except (RuntimeError, OSError) as exc:
            print(f"aftersales simulate: {exc}", file=sys.stderr)
            return 1
        finally:
            summary.elapsed = feed.elapsed()
            summary.confirmed, summary.nacked = publisher.confirmed, publisher.nacked
            summary.returned = publisher.returned
    print(_progress_line(summary, summary.elapsed, summary.confirmed, final=True),
          file=sys.stderr)
    doc = summary.to_dict()
    doc["run_id"] = gen.run_id
    doc["seed"] = seed
    print("simulate: by type " + ", ".join(f"{k} {v}" for k, v in doc["events_by_type"].items()),
          file=sys.stderr)
    path = getattr(args, "summary", None)
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, ensure_ascii=False, indent=2)
    return 0 if summary.nacked == 0 and summary.returned == 0 else 1
