#!/usr/bin/env bash
# Mutation testing of the domain core (shared/domain/) against the domain unit tests
# (tests/unit/domain/), with mutmut. Not part of CI (over an hour on 2 busy cores;
# flows.py's mutants alone, about 16 minutes with 1 worker).
#   scripts/mutation.sh            # run, then print the score
#   scripts/mutation.sh 'shared.domain.flows.*'   # run only these mutants (mutmut names,
#                                  # globs allowed), then print the score
#   scripts/mutation.sh --score    # print the score of the last run
# The work happens in a copy of the sources ($MUTATION_DIR, default /tmp/aftersales-mutation)
# so the worktree is never touched. Not mutated: ruledoc.py (it renders docs/rules.md).
# flows.py builds its tables on first use and the domain tests rebuild them in each test
# (tests/unit/domain/conftest.py), so its mutants take effect in mutmut's forked workers.
# The score counts a mutant that only changes the wording of a message as equivalent
# (scripts/mutation_score.py; docs/design.md "Mutation testing").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BASE="${MUTATION_DIR:-/tmp/aftersales-mutation}"
PY="$ROOT/.venv/bin/python"
MUTMUT="$ROOT/.venv/bin/mutmut"
[ -x "$MUTMUT" ] || { echo "mutmut missing: .venv/bin/pip install -e '.[mutation]'"; exit 2; }

prepare() {  # $1 = folder, $2 = extra [mutmut] lines
  rm -rf "$1" && mkdir -p "$1/tests/unit" "$1/docs"
  cp -r "$ROOT/shared" "$1/shared"
  cp -r "$ROOT/tests/unit/domain" "$1/tests/unit/domain"
  cp "$ROOT/docs/rules.md" "$1/docs/"
  cp "$ROOT/pyproject.toml" "$1/"
  find "$1" -name __pycache__ -prune -exec rm -rf {} +
  cat > "$1/setup.cfg" <<CFG
[mutmut]
source_paths = shared/domain/
also_copy =
    shared/
    docs/
pytest_add_cli_args_test_selection = tests/unit/domain/
pytest_add_cli_args = -p no:cacheprovider -q
$2
CFG
}

run() {  # $1 = folder, then the mutants to run (all when none)
  local folder="$1"; shift
  (cd "$folder" && AFTERSALES_PROPERTY_SCALE="${AFTERSALES_PROPERTY_SCALE:-0.1}" \
    "$MUTMUT" run --max-children "${MUTATION_JOBS:-2}" "$@") || true
}

if [ "${1:-}" != "--score" ]; then
  prepare "$BASE" "do_not_mutate =
    shared/domain/ruledoc.py"
  run "$BASE" "$@"
fi
"$PY" "$ROOT/scripts/mutation_score.py" "$BASE"
