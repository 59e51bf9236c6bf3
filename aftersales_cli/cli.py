"""The `aftersales` console script."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from aftersales_cli.settings import command_settings as _settings
from shared.config import SERVICES, Settings
from shared.errors import ConfigError


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from shared.db.migrate import upgrade

    settings = _settings()
    upgrade(settings.database_url, args.revision)
    print(f"database schema at {args.revision}")
    return 0


def _prepare_metrics_dir(settings: Settings, service: str) -> None:
    """Every process of the service's tree writes its metric files here; the supervisor
    serves their sum. Must happen before any metric is touched."""
    from shared import metrics
    from shared.bootstrap import metrics_dir_for

    metrics.prepare_multiproc_dir(metrics_dir_for(settings.metrics_dir, service, os.getpid()))


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings()
    if args.service == "all":
        from aftersales_cli.runall import run_all

        return run_all()
    if args.service != "console":  # the console serves no metrics
        _prepare_metrics_dir(settings, args.service)
    from importlib import import_module

    main = import_module(f"services.{args.service}.main")
    try:
        return int(main.run(settings))
    except ConfigError as exc:
        print(f"aftersales: {exc}", file=sys.stderr)
        return 2


def cmd_publish(args: argparse.Namespace) -> int:
    from shared.publish_events import publish_file

    settings = _settings()
    count = publish_file(settings.amqp_url, args.file, settings.queue_type)
    print(f"published {count} events with confirms", file=sys.stderr)
    return 0


def cmd_case_show(args: argparse.Namespace) -> int:
    from aftersales_cli.caseview import show_case

    settings = _settings()
    return show_case(settings, args.case_id, as_json=args.json)


def cmd_schemas(args: argparse.Namespace) -> int:
    from aftersales_cli.schemadoc import write_schemas

    for path in write_schemas(Path(args.out)):
        print(path)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from aftersales_cli.simulate.command import run_simulation

    return int(run_simulation(_settings(), args))


def cmd_retention_run(args: argparse.Namespace) -> int:
    from aftersales_cli.retention import run_command

    return run_command(_settings(), args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aftersales",
        description="After-sales (售后) deadline engine: intake, timer, resolver, notifier.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = db_sub.add_parser("upgrade", help="create or migrate the schema (Alembic)")
    up.add_argument("revision", nargs="?", default="head", help="target revision (default head)")
    up.set_defaults(func=cmd_db_upgrade)

    run = sub.add_parser("run", help="run a service in the foreground")
    run.add_argument("service", choices=[*SERVICES, "gateway", "all", "console"],
                     help="which service; all = the four and the gateway; console = the ops "
                          "web console")
    run.set_defaults(func=cmd_run)

    pub = sub.add_parser("publish", help="publish events (JSON lines) as an upstream would")
    pub.add_argument("file", help="a file of JSON lines, or - for standard input")
    pub.set_defaults(func=cmd_publish)

    case = sub.add_parser("case", help="look at cases")
    case_sub = case.add_subparsers(dest="case_command", required=True, metavar="ACTION")
    show = case_sub.add_parser("show", help="a case, its timeline and its pending deadlines")
    show.add_argument("case_id")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=cmd_case_show)

    from aftersales_cli.ops.cli import register as register_ops

    register_ops(sub, case_sub, _settings)
    retention = sub.add_parser("retention", help="archive and remove finished cases")
    retention_sub = retention.add_subparsers(dest="retention_command", required=True,
                                             metavar="ACTION")
    retention_run = retention_sub.add_parser(
        "run", help="archive, then remove, closed cases past AFTERSALES_RETENTION_DAYS")
    from aftersales_cli.retention import add_arguments as add_retention_arguments

    add_retention_arguments(retention_run)
    retention_run.set_defaults(func=cmd_retention_run)

    schemas = sub.add_parser("schemas", help="write the event JSON Schemas")
    schemas.add_argument("--out", default="schemas/v1", help="folder (default schemas/v1)")
    schemas.set_defaults(func=cmd_schemas)

    sim = sub.add_parser("simulate", help="publish realistic after-sales traffic")
    sim.add_argument("--rate", type=float, default=50.0, help="events per second")
    sim.add_argument("--duration", type=float, default=60.0, help="seconds")
    sim.add_argument("--seed", type=int, default=None)
    from aftersales_cli.simulate.command import add_arguments

    add_arguments(sim)
    sim.set_defaults(func=cmd_simulate)

    from aftersales_cli import calendarcmd, rulescmd

    calendarcmd.add_parser(sub)
    rulescmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
