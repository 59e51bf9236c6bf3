"""`aftersales rules list|check|what-if`: the rule sets in force, checking a proposed file,
and what a proposed rule or holiday file would do to the open cases."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from aftersales_cli.settings import command_settings as _settings
from shared.domain import RuleBook
from shared.domain.errors import DataFileError


def book_listing(book: RuleBook) -> list[dict[str, Any]]:
    out = []
    for name in book.set_names:
        for v in book.versions(name):
            out.append({
                "set": name, "version": v.version, "effective": v.effective.isoformat(),
                "origin": v.origin, "overrides": v.overrides or None, "file": v.source_file,
                "source": v.source, "rules": len(v.rules),
            })
    for p in book.shop_policies:
        out.append({
            "set": p.set_name, "version": p.version, "effective": p.effective.isoformat(),
            "origin": p.origin, "overrides": None, "file": p.source_file,
            "source": p.source, "rules": len(p.rules),
        })
    return out


def render_listing(rows: list[dict[str, Any]]) -> str:
    width = max([12, *(len(r["set"]) for r in rows)])
    lines = [f"{'set':<{width}} version       effective   origin  rules  source"]
    for r in rows:
        origin = r["origin"] + ("*" if r["overrides"] else "")
        lines.append(f"{r['set']:<{width}} {r['version']:<13} {r['effective']}  {origin:<6}  "
                     f"{r['rules']:>5}  {r['source'] or '-'}")
    overridden = [r for r in rows if r["overrides"]]
    for r in overridden:
        lines.append(f"* {r['set']} {r['version']}: {r['file']} replaces the shipped "
                     f"{r['overrides']}")
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    settings = _settings()
    try:
        book = RuleBook.load(settings.rules)
    except DataFileError as exc:
        print(f"aftersales: {exc}", file=sys.stderr)
        return 1
    rows = book_listing(book)
    print(json.dumps(rows, ensure_ascii=False, indent=2) if args.json else render_listing(rows))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate PATH as it would be laid over the shipped sets; errors as file:line."""
    path = Path(args.path)
    if not path.exists():
        print(f"{path}: no such file or folder", file=sys.stderr)
        return 1
    try:
        book = RuleBook.load(path)
    except DataFileError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    mine = [r for r in book_listing(book) if r["origin"] == "user"]
    print(f"{path}: ok, {len(mine)} version(s) of {len({r['set'] for r in mine})} set(s)")
    for r in mine:
        action = f"replaces shipped {r['overrides']}" if r["overrides"] else "adds"
        print(f"  {r['set']} {r['version']} (effective {r['effective']}): {action}")
    return 0


def cmd_what_if(args: argparse.Namespace) -> int:
    from aftersales_cli.whatif import proposed_engine, render, what_if
    from shared.bootstrap import build_domain
    from shared.db.session import Database, make_engine

    settings = _settings()
    proposal = Path(args.path)
    if not proposal.exists():
        print(f"{proposal}: no such file or folder", file=sys.stderr)
        return 1
    current = build_domain(settings)
    try:
        proposed, kind = proposed_engine(settings.rules, settings.holidays, proposal)
    except DataFileError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    sql_engine = make_engine(settings.database_url, pool_size=1)
    try:
        report = what_if(Database(sql_engine), current, proposed, examples=args.examples)
    finally:
        sql_engine.dispose()
    if args.json:
        print(json.dumps({"proposal": {"path": str(proposal), "kind": kind},
                          **report.to_dict()}, ensure_ascii=False, indent=2))
    else:
        print(render(report, str(proposal), kind))
    return 0


def add_parser(sub: Any) -> None:
    rules = sub.add_parser("rules", help="rule sets: list, check a file, what-if")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    listing = rules_sub.add_parser(
        "list", help="sets, versions, effective dates and sources (with AFTERSALES_RULES)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_list)
    check = rules_sub.add_parser(
        "check", help="validate a rule file or folder (errors as file:line; exit 1)")
    check.add_argument("path")
    check.set_defaults(func=cmd_check)
    what = rules_sub.add_parser(
        "what-if", help="what a proposed rule or holiday file would do to the open cases "
        "(read-only)")
    what.add_argument("path", help="a rule file or folder, or a holiday file")
    what.add_argument("--json", action="store_true", help="machine-readable output")
    what.add_argument("--examples", type=int, default=5, help="example cases (default 5)")
    what.set_defaults(func=cmd_what_if)
