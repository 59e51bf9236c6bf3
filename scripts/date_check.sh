#!/usr/bin/env bash
# The date-sensitive tests (partitions, retention, and the unit suite: calendars, month
# arithmetic) run as if it were another day, to find a test that fails only on some dates
# (a month's last days, 1 January) before CI meets that day. Not part of CI.
#
#   scripts/date_check.sh ["2026-12-31 20:00:00" ...]    (UTC; default: the dates below)
#
# A private PostgreSQL of its own (the machine's server binaries, a temporary folder, a free
# port) runs under libfaketime with the offset, and so does pytest. Left out: the retention
# test of a DROP that waits for its lock (PostgreSQL's lock_timeout does not fire under a
# faked clock; it hangs on any date) and the e2e tests (their services and brokers would
# need the fake clock too).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || AFTERSALES_SKIP_MIGRATE=1 scripts/setup.sh
LIB=$(ls /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1 \
      2>/dev/null | head -1 || true)
[ -n "$LIB" ] || { echo "libfaketime is missing (apt-get install faketime)" >&2; exit 1; }
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
if [ "$#" -eq 0 ]; then
  set -- "$(date -u -d "$(date -u +%Y-%m-01) +1 month -1 day" '+%Y-%m-%d') 23:30:00" \
         "$(date -u -d "$(date -u +%Y-%m-01) +1 month" '+%Y-%m-%d') 00:30:00" \
         "$(date -u +%Y)-12-31 20:00:00" "$(( $(date -u +%Y) + 1 ))-01-01 00:30:00"
fi
DIR=$(mktemp -d /tmp/aftersales-date-check.XXXXXX)
chmod 755 "$DIR"
PORT=$(.venv/bin/python -c "from tests.resources import free_port; print(free_port())")
RUN_AS=(); [ "$(id -u)" -eq 0 ] && { chown postgres "$DIR"; RUN_AS=(su postgres -c); }
as_pg() { if [ ${#RUN_AS[@]} -gt 0 ]; then "${RUN_AS[@]}" "$*"; else bash -c "$*"; fi; }
stop_pg() { as_pg "$PG_BIN/pg_ctl -D $DIR/data -m fast stop" >/dev/null 2>&1 || true; }
trap 'stop_pg; rm -rf "$DIR"' EXIT
as_pg "$PG_BIN/initdb -D $DIR/data -A trust -U postgres" >/dev/null
failed=0
for day in "$@"; do
  offset=$(( $(date -u -d "$day" +%s) - $(date -u +%s) ))
  # Monotonic clocks stay real: a faked one makes timed waits outlast their timeouts.
  fake="LD_PRELOAD=$LIB FAKETIME=+$offset FAKETIME_DONT_FAKE_MONOTONIC=1"
  stop_pg
  as_pg "env $fake $PG_BIN/pg_ctl -D $DIR/data -w -l $DIR/log \
         -o '-p $PORT -k $DIR -c listen_addresses=127.0.0.1'" start >/dev/null
  echo "== $day (the database says $(psql -h 127.0.0.1 -p "$PORT" -U postgres -Atc 'SELECT now()'))"
  env $fake AFTERSALES_TEST_PG_ADMIN="postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres" \
    .venv/bin/python -m pytest -q -p no:cacheprovider --timeout 120 tests/unit \
    tests/integration/test_partitions.py tests/integration/test_retention.py \
    --deselect tests/integration/test_partitions.py::test_a_drop_that_cannot_get_its_lock_waits_for_the_next_run \
    | tail -3 || failed=1
done
exit "$failed"
