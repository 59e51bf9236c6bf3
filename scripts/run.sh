#!/usr/bin/env bash
# Sets up what is missing, then runs all four services (Ctrl-C stops them).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Local use: with no SMTP server where the settings point, write emails to the log (as
# SMS go to the log provider by default) instead of retrying them for hours.
smtp_host=${AFTERSALES_SMTP_HOST:-127.0.0.1} smtp_port=${AFTERSALES_SMTP_PORT:-25}
if [ -z "${AFTERSALES_EMAIL_TRANSPORT:-}" ] \
   && ! (exec 3<>"/dev/tcp/$smtp_host/$smtp_port") 2>/dev/null; then
  echo "[run] no SMTP server on $smtp_host:$smtp_port: emails go to the log" \
       "(set AFTERSALES_SMTP_HOST/PORT to send them)" >&2
  export AFTERSALES_EMAIL_TRANSPORT=log
fi
exec .venv/bin/aftersales run all "$@"
