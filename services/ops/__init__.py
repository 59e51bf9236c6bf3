"""Ops tools: rejected and unrouted messages, case search and explanations, ops actions.

The reading and writing code lives here once; the `aftersales` command (aftersales_cli/ops/cli.py)
and the web console (services/console/) both call it."""
