"""The ops commands of `aftersales`: registered by aftersales_cli/cli.py, implemented here."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from shared.config import Settings

SettingsFactory = Callable[[], Settings]


def register(sub: argparse._SubParsersAction, case_sub: argparse._SubParsersAction,
             settings: SettingsFactory) -> None:
    """Add `broker`, `rejected`, `unrouted` and the ops actions of `case`."""
    broker = sub.add_parser("broker", help="RabbitMQ set-up that is not a declaration")
    broker_sub = broker.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    policy = broker_sub.add_parser(
        "policy", help="apply the policy that keeps unrouted decisions (alternate exchange)")
    policy.add_argument("--print", dest="print_only", action="store_true",
                        help="only print the rabbitmqctl command")

    def run_policy(args: argparse.Namespace) -> int:
        from services.ops.policy import apply_policy

        return apply_policy(settings(), args.print_only)

    policy.set_defaults(func=run_policy)

    def with_settings(handler: Callable[[Settings, argparse.Namespace], int]
                      ) -> Callable[[argparse.Namespace], int]:
        return lambda args: handler(settings(), args)

    from aftersales_cli.ops import held_cli

    for kind, queue, what in (
            ("rejected", "aftersales.events.rejected", "events intake refused"),
            ("unrouted", "aftersales.decisions.unrouted", "decisions no queue was bound for")):
        group = sub.add_parser(kind, help=f"{what} ({queue}): list, show, replay")
        group.set_defaults(kind=kind)
        actions = group.add_subparsers(dest=f"{kind}_command", required=True, metavar="ACTION")
        listing = actions.add_parser("list", help="list without taking them off the queue")
        held_cli.add_filters(listing)
        listing.add_argument("--limit", type=int, default=10_000)
        listing.add_argument("--json", action="store_true")
        listing.set_defaults(func=with_settings(held_cli.cmd_list))
        show = actions.add_parser("show", help="one message: headers and body")
        show.add_argument("id")
        show.add_argument("--json", action="store_true")
        show.set_defaults(func=with_settings(held_cli.cmd_show))
        again = actions.add_parser(
            "replay", help="publish again and take off the queue once RabbitMQ confirmed the copy")
        again.add_argument("ids", nargs="*", metavar="ID")
        held_cli.add_filters(again)
        again.add_argument("--all", action="store_true", help="every held message")
        again.add_argument("--dry-run", action="store_true", help="only say what it would do")
        again.add_argument("--yes", action="store_true", help="no confirmation question")
        again.add_argument("--json", action="store_true")
        again.set_defaults(func=with_settings(held_cli.cmd_replay))

    from aftersales_cli.ops import cases_cli

    search = case_sub.add_parser("search", help="cases by shop, order, platform, kind, step...")
    cases_cli.add_search_arguments(search)
    search.set_defaults(func=with_settings(cases_cli.cmd_search))
    explain = case_sub.add_parser(
        "explain", help="why each pending deadline and automatic decision is what it is")
    explain.add_argument("case_id")
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(func=with_settings(cases_cli.cmd_explain))

    for action, what in (("pause", "pause the step's clock (an intervention by ops)"),
                         ("resume", "resume the clock after an ops pause"),
                         ("extend", "extend the step's deadline (a goodwill extension)")):
        parser = case_sub.add_parser(action, help=what)
        parser.add_argument("case_id")
        parser.add_argument("--reason", required=True, help="why: recorded in the timeline")
        parser.add_argument("--by", help="who (default: your login name)")
        if action == "extend":
            amount = parser.add_mutually_exclusive_group(required=True)
            amount.add_argument("--hours", type=float, help="add this much to the deadline")
            amount.add_argument("--until", help="the new deadline (ISO time)")
        parser.add_argument("--wait", type=float, default=10.0,
                            help="seconds to wait for intake's verdict (default 10)")
        parser.add_argument("--json", action="store_true")
        parser.set_defaults(func=with_settings(cases_cli.cmd_action), action=action)
