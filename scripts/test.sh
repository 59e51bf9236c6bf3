#!/usr/bin/env bash
# Sets up what is missing, then runs the linters and the whole test suite.
# Exits non-zero on any failure, including "no tests ran".
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
exit "$status"
