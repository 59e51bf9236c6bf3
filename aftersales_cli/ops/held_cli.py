"""`aftersales rejected|unrouted list|show|replay`: the terminal side of services/ops/held.py."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

from services.ops.held import (
    KINDS,
    HeldMessage,
    Selection,
    find_held,
    list_held,
    parse_since,
    replay,
)
from shared.config import Settings
from shared.domain.timeutil import CHINA_TZ


def _local(value: datetime | None) -> str:
    return value.astimezone(CHINA_TZ).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(
        ids=frozenset(getattr(args, "ids", None) or ()),
        reason=args.reason, routing_key=args.key,
        since=parse_since(args.since) if args.since else None,
        everything=bool(getattr(args, "all", False)))


def _line(message: HeldMessage) -> str:
    detail = (message.detail or "").replace("\n", " ")
    return (f"{message.id}  {_local(message.held_at)}  {message.reason:<16} "
            f"{message.routing_key or '-':<24} {detail[:80]}")


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    kind = KINDS[args.kind]
    found, total = list_held(settings.amqp_url, kind, _selection(args), limit=args.limit,
                             queue_type=settings.queue_type)
    if args.json:
        print(json.dumps({"queue": kind.queue, "in_queue": total,
                          "messages": [m.summary() for m in found]}, ensure_ascii=False))
        return 0
    print(f"{kind.queue}: {total} held, {len(found)} shown (Asia/Shanghai times)")
    print(f"{'id':<16}  {'held at':<19}  {'reason':<16} {'routing key':<24} detail")
    for message in found:
        print(_line(message))
    return 0


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    kind = KINDS[args.kind]
    message = find_held(settings.amqp_url, kind, args.id, settings.queue_type)
    if message is None:
        print(f"aftersales: no message {args.id} in {kind.queue}", file=sys.stderr)
        return 1
    doc = message.document()
    if args.json:
        print(json.dumps(doc, ensure_ascii=False))
        return 0
    for key in ("id", "reason", "detail", "routing_key", "message_id", "bytes", "redelivered"):
        print(f"{key:<12} {doc[key]}")
    print(f"{'held at':<12} {doc['held_at']} ({_local(message.held_at)} Asia/Shanghai)")
    print(f"{'headers':<12} {json.dumps(doc['headers'], ensure_ascii=False)}")
    print(f"{'replayed as':<12} {json.dumps(doc['replay_headers'], ensure_ascii=False)}")
    print("body:")
    print(doc["body"])
    return 0


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    kind = KINDS[args.kind]
    selection = _selection(args)
    if selection.empty:
        print("aftersales: say which: IDs, --reason/--key/--since, or --all", file=sys.stderr)
        return 2
    if not args.dry_run and not args.yes and not args.ids:
        found, _ = list_held(settings.amqp_url, kind, selection,
                             queue_type=settings.queue_type)
        print(f"{len(found)} messages of {kind.queue} match:", file=sys.stderr)
        for message in found[:20]:
            print("  " + _line(message), file=sys.stderr)
        if not found:
            return 0
        if not sys.stdin.isatty():
            print("aftersales: add --yes to replay them (or --dry-run)", file=sys.stderr)
            return 2
        answer = input(f"replay {len(found)} messages to {kind.target_exchange}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing replayed", file=sys.stderr)
            return 1
    verb = "would replay" if args.dry_run else "replayed"

    def progress(message: HeldMessage) -> None:
        if not args.json:
            print(f"{verb} {message.id} ({message.reason}) -> {kind.target_exchange} "
                  f"{message.routing_key or 'replayed'}", flush=True)

    report = replay(settings.amqp_url, kind, selection, dry_run=args.dry_run,
                    progress=progress, queue_type=settings.queue_type)
    if args.json:
        print(json.dumps(report.document(), ensure_ascii=False))
    else:
        for ident in report.returned:
            print(f"not taken by {kind.target_exchange}: {ident} stays in {kind.queue}")
        print(f"{verb} {len(report.replayed)} of {kind.queue} to {kind.target_exchange}"
              f" (run {report.run_id}); {report.left_in_queue} left in the queue"
              + (f"; reconnected {report.reconnects} times" if report.reconnects else ""))
    missing = set(selection.ids) - {m.id for m in report.replayed} - set(report.returned)
    for ident in sorted(missing):
        print(f"aftersales: no message {ident} in {kind.queue}", file=sys.stderr)
    return 1 if missing else 0


def add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", help="only this reason (e.g. schema, malformed, NO_ROUTE)")
    parser.add_argument("--key", help="only this original routing key")
    parser.add_argument("--since", help="held since: ISO time, a date, or 30m / 2h / 7d ago")
