#!/usr/bin/env bash
# Brings a machine to the point where aftersales can run and be tested:
#   - a virtual environment (.venv) with the project and its test tools,
#   - PostgreSQL, Redis and RabbitMQ reachable on 127.0.0.1 (installed from the OS
#     packages and started only if they are not already running),
#   - the database schema migrated.
# Idempotent: on a machine that has everything it only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && exec 3>&- ; }

wait_port() {  # wait_port PORT NAME SECONDS
  local i
  for ((i = 0; i < $3 * 5; i++)); do port_open "$1" && return 0; sleep 0.2; done
  say "$2 did not come up on port $1"; return 1
}

APT_UPDATED=""
apt_install() {
  if ! command -v apt-get >/dev/null; then
    say "cannot install $* here (no apt-get): install it yourself and run again"; exit 1
  fi
  if [ -z "$APT_UPDATED" ]; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
  say "installing $* from the OS packages"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# --- Python environment ------------------------------------------------------------
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "Python 3.11 or newer is needed (found: $($PY --version 2>&1))"; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv || { apt_install python3-venv; "$PY" -m venv .venv; }
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  say "installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".[test]"
  rm -f .venv/.installed-*; touch "$stamp"
fi

# --- PostgreSQL ----------------------------------------------------------------------
if ! port_open 5432; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
  fi
  ver=$(ls /etc/postgresql | sort -V | tail -1)
  say "starting PostgreSQL $ver"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start || $SUDO pg_ctlcluster "$ver" main start
  wait_port 5432 PostgreSQL 30
fi
# Local development only: trust connections from this machine, as the defaults expect,
# where they are not trusted yet (a cluster that already lets us in is left alone). Also
# where the package started the cluster itself (systemd does so at install): the lines
# take effect only once PostgreSQL reloads its configuration, so reload after the edit.
if ! psql -w -h 127.0.0.1 -U postgres -tAc "SELECT 1" >/dev/null 2>&1 \
    && ls /etc/postgresql/*/main >/dev/null 2>&1; then
  ver=$(ls /etc/postgresql | sort -V | tail -1)
  hba=/etc/postgresql/$ver/main/pg_hba.conf
  if [ -f "$hba" ] && ! $SUDO grep -q "aftersales-local" "$hba"; then
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust # aftersales-local\nhost all all ::1/128 trust # aftersales-local' "$hba"
    say "trusting local connections in $hba; reloading PostgreSQL $ver"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main reload 2>/dev/null \
      || $SUDO pg_ctlcluster "$ver" main reload
  fi
fi
# The default URL connects as the current OS user: make sure that role exists.
# -w: never prompt for a password (a script must not hang waiting for one).
if ! psql -w -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_roles WHERE rolname='$(id -un)'" 2>/dev/null | grep -q 1; then
  psql -w -h 127.0.0.1 -U postgres -qc "CREATE ROLE \"$(id -un)\" LOGIN SUPERUSER" 2>/dev/null \
    || say "could not create the PostgreSQL role $(id -un) (is local trust in pg_hba.conf?)"
fi

# --- Redis ---------------------------------------------------------------------------
if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting Redis"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/aftersales.log
  wait_port 6379 Redis 30
fi

# --- RabbitMQ ------------------------------------------------------------------------
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  say "starting RabbitMQ"
  $SUDO rabbitmq-server -detached
  wait_port 5672 RabbitMQ 90
fi
# Queue depths come from RabbitMQ's own Prometheus plugin (port 15692).
if command -v rabbitmq-plugins >/dev/null && ! port_open 15692; then
  $SUDO rabbitmq-plugins enable --quiet rabbitmq_prometheus >/dev/null 2>&1 || true
fi

# --- libfaketime (the clock-skew fault tests run services with a host clock off) -------
if ! ls /usr/lib/*/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1 >/dev/null 2>&1; then
  apt_install faketime
fi

# The policy that keeps decisions no upstream queue is bound for (shared/broker_policy.py),
# on the vhost of AFTERSALES_AMQP_URL (default /). Idempotent.
if command -v rabbitmqctl >/dev/null; then
  $SUDO .venv/bin/aftersales broker policy >/dev/null \
    || say "could not apply the RabbitMQ policy: see aftersales broker policy --print"
fi

# --- Chromium (the console's browser tests) -----------------------------------------------
# Debian's chromium, driven by Playwright; Playwright never downloads a browser of its own.
if [ ! -x /usr/bin/chromium ]; then
  apt_install chromium
fi

# The rejected queue's bounds (max length, max bytes, TTL): an operator policy, so it
# also reaches queues that deployments declared before it existed.
if command -v rabbitmqctl >/dev/null && [ "${AFTERSALES_SKIP_POLICIES:-}" != 1 ]; then
  RABBITMQCTL="$SUDO rabbitmqctl" deploy/rabbitmq/policies.sh "${AFTERSALES_RABBITMQ_VHOST:-/}" \
    || say "could not set the RabbitMQ policies (deploy/rabbitmq/policies.sh): set them by hand"
fi

# --- promtool (alert rule tests) -------------------------------------------------------
if [ -x scripts/install_prometheus.sh ]; then scripts/install_prometheus.sh; fi

# --- schema --------------------------------------------------------------------------
if [ "${AFTERSALES_SKIP_MIGRATE:-}" != 1 ]; then
  .venv/bin/aftersales db upgrade >/dev/null
  say "database schema up to date"
fi
say "ready"
