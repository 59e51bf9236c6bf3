#!/usr/bin/env bash
# Sets up what is missing, then runs the linters and the whole test suite.
# Exits non-zero on any failure, including "no tests ran".
# The cluster test (pytest -m cluster: three RabbitMQ nodes of its own) runs as a separate
# step after the main suite, which excludes it (addopts in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
AFTERSALES_SKIP_MIGRATE=1 scripts/setup.sh   # the tests migrate their own database
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then echo "no tests ran: that is a failure" >&2; exit 1; fi
if [ "$#" -gt 0 ]; then exit "$status"; fi  # arguments given: that run only
echo "== pytest -m cluster (three-node RabbitMQ cluster; -s prints its [cluster report])"
set +e
.venv/bin/python -m pytest -s -m cluster tests/cluster
cluster_status=$?
set -e
if [ "$cluster_status" -eq 5 ]; then echo "no cluster test ran: that is a failure" >&2; exit 1; fi
if [ "$status" -ne 0 ]; then exit "$status"; fi
exit "$cluster_status"
