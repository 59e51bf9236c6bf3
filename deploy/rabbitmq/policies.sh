#!/bin/sh
# RabbitMQ operator policies of aftersales, applied to one virtual host (default "/").
#
#   deploy/rabbitmq/policies.sh [VHOST]
#   docker compose exec -T rabbitmq sh -s -- / < deploy/rabbitmq/policies.sh
#   kubectl exec -i rabbitmq-0 -- sh -s -- aftersales < deploy/rabbitmq/policies.sh
#
# aftersales.events.rejected is bounded by a policy, not by queue arguments: changing the
# arguments of a declared queue fails with PRECONDITION_FAILED on every deployment that
# already has it. An *operator* policy is used because it combines with any user policy
# on the same queue (e.g. a quorum queue's delivery-limit); the stricter limit wins.
# When a limit is reached the oldest messages are dropped (drop-head), and every message
# is dropped when its TTL has passed: with it goes the personal data it carries.
#
# Limits (environment): AFTERSALES_REJECTED_MAX_LENGTH (messages, default 100000),
# AFTERSALES_REJECTED_MAX_BYTES (default 536870912 = 512 MiB),
# AFTERSALES_REJECTED_TTL_DAYS (default 14). RABBITMQCTL: the command (default rabbitmqctl).
set -eu
VHOST="${1:-/}"
MAX_LENGTH="${AFTERSALES_REJECTED_MAX_LENGTH:-100000}"
MAX_BYTES="${AFTERSALES_REJECTED_MAX_BYTES:-536870912}"
TTL_DAYS="${AFTERSALES_REJECTED_TTL_DAYS:-14}"
TTL_MS=$((TTL_DAYS * 86400000))
${RABBITMQCTL:-rabbitmqctl} -q set_operator_policy -p "$VHOST" --apply-to queues \
  aftersales-rejected-bounded '^aftersales\.events\.rejected$' \
  "{\"max-length\": $MAX_LENGTH, \"max-length-bytes\": $MAX_BYTES, \"message-ttl\": $TTL_MS}"
echo "aftersales-rejected-bounded on vhost $VHOST: at most $MAX_LENGTH messages," \
  "$MAX_BYTES bytes, $TTL_DAYS days each" >&2
