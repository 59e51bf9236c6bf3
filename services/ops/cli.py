"""The ops commands of `aftersales`: registered by services/cli.py, implemented here."""

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
