"""Ops tools: rejected and unrouted messages, case search and explanations, ops actions.

The reading and writing code lives here once; the `aftersales` command (services/ops/cli.py)
and the web console (services/console/) both call it."""
