#!/usr/bin/env bash
# Removes what interrupted test runs may leave behind on this machine: test and demo
# databases (rekey_test_*, rekey_demo_*) and their RabbitMQ queues. Run it only when no
# test is running: it drops databases other tests may be using.
set -euo pipefail
PSQL=(psql -h "${PGHOST:-127.0.0.1}" -U "${PGUSER:-postgres}" -Atq)
for db in $("${PSQL[@]}" -c "SELECT datname FROM pg_database WHERE datname ~ '^rekey_(test|demo)_'"); do
  "${PSQL[@]}" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" && echo "dropped database $db"
done
for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep -E '^rekey_(test|demo)_' || true); do
  rabbitmqctl -q delete_queue "$q" >/dev/null && echo "deleted queue $q"
done
