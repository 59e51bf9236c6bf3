#!/usr/bin/env bash
# Mutation testing of the domain core (shared/domain/) against the domain unit tests
# (tests/unit/domain/), with mutmut. Not part of CI: it runs every mutant against the
# tests that reach it (about an hour on 2 cores). Usage:
#   scripts/mutation.sh            # run, then print the score
#   scripts/mutation.sh --score    # print the score of the last run
# The work happens in a copy ($MUTATION_DIR, default /tmp/aftersales-mutation) so the
# worktree is never touched. The score counts a mutant that only changes the wording of
# a problem / error message as equivalent (docs/design.md "Mutation testing").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${MUTATION_DIR:-/tmp/aftersales-mutation}"
PY="$ROOT/.venv/bin/python"
MUTMUT="$ROOT/.venv/bin/mutmut"
[ -x "$MUTMUT" ] || { echo "mutmut missing: $ROOT/.venv/bin/pip install 'mutmut>=3.3,<4'"; exit 2; }

if [ "${1:-}" != "--score" ]; then
  rm -rf "$WORK" && mkdir -p "$WORK/tests/unit"
  cp -r "$ROOT/shared" "$WORK/shared"
  cp -r "$ROOT/tests/unit/domain" "$WORK/tests/unit/domain"
  mkdir -p "$WORK/docs" && cp "$ROOT/docs/rules.md" "$WORK/docs/"
  cp "$ROOT/pyproject.toml" "$WORK/"
  find "$WORK" -name __pycache__ -prune -exec rm -rf {} +
  cat > "$WORK/setup.cfg" <<'CFG'
[mutmut]
source_paths = shared/domain/
also_copy =
    shared/
    docs/
# ruledoc only writes docs/rules.md (its prose is checked against the file, not behaviour)
do_not_mutate = shared/domain/ruledoc.py
pytest_add_cli_args_test_selection = tests/unit/domain/
pytest_add_cli_args = -p no:cacheprovider -q
CFG
  cd "$WORK"
  AFTERSALES_PROPERTY_SCALE="${AFTERSALES_PROPERTY_SCALE:-0.1}" \
    "$MUTMUT" run --max-children "${MUTATION_JOBS:-2}" || true
fi
cd "$WORK"
"$PY" "$ROOT/scripts/mutation_score.py"
