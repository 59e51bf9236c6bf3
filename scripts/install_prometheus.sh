#!/usr/bin/env bash
# Install promtool and the prometheus binary from Debian's `prometheus` package (it ships
# both) when either is missing. Idempotent: does nothing if both are already on PATH.
# Used by the setup script and CI: tests/deploy/test_prometheus_rules.py needs promtool,
# tests/e2e/test_observability.py runs /usr/bin/prometheus against the services.
#
# The package's postinst enables a prometheus system service on :9090; this script stops
# and disables it if it got started: the project runs Prometheus itself when it wants one
# (deploy/prometheus/prometheus.yml, deploy/docker-compose.yml).
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    echo "prometheus and promtool already installed: $(prometheus --version 2>&1 | head -n1)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "prometheus/promtool missing and apt-get is not available: install Prometheus (both binaries) by hand" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
# Keep the package's maintainer scripts from starting the daemon where policy-rc.d is
# honoured (containers); restored afterwards.
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    CREATED_POLICY=1
fi
cleanup() {
    if [ "$CREATED_POLICY" = 1 ]; then
        $SUDO rm -f "$POLICY"
    fi
}
trap cleanup EXIT

$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null

# If a service manager started the daemon anyway, stop it and keep it from starting.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
elif command -v service >/dev/null 2>&1; then
    $SUDO service prometheus stop >/dev/null 2>&1 || true
fi

for bin in promtool prometheus; do
    command -v "$bin" >/dev/null 2>&1 || { echo "$bin still missing after install" >&2; exit 1; }
done
echo "installed: $(prometheus --version 2>&1 | head -n1)"
