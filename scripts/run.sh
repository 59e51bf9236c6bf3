#!/usr/bin/env bash
# Sets up what is missing, then runs all four services (Ctrl-C stops them).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/aftersales run all "$@"
