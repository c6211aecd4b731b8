#!/usr/bin/env bash
# Removes what interrupted test runs may leave behind on this machine: test and demo
# databases (rekey_test_*, rekey_demo_*) and their RabbitMQ queues, the compose tests'
# projects, the custody tests' token directories. Run it only when no
# test is running: it drops databases other tests may be using.
set -euo pipefail
PSQL=(psql -h "${PGHOST:-127.0.0.1}" -U "${PGUSER:-postgres}" -Atq)
for db in $("${PSQL[@]}" -c "SELECT datname FROM pg_database WHERE datname ~ '^rekey_(test|demo)_'"); do
  "${PSQL[@]}" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" && echo "dropped database $db"
done
for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep -E '^rekey_(test|demo)_' || true); do
  rabbitmqctl -q delete_queue "$q" >/dev/null && echo "deleted queue $q"
done
# Compose projects of interrupted compose tests (loadtest/tests/it/compose.rs names them
# rekeyt<number>): their containers, networks and volumes. The images stay (a cache).
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  for p in $(docker ps -a --format '{{.Label "com.docker.compose.project"}}' | grep -E '^rekeyt[0-9]+$' | sort -u); do
    docker ps -aq --filter "label=com.docker.compose.project=$p" | xargs -r docker rm -f >/dev/null
    docker network ls -q --filter "label=com.docker.compose.project=$p" | xargs -r docker network rm >/dev/null
    docker volume ls -q --filter "label=com.docker.compose.project=$p" | xargs -r docker volume rm >/dev/null
    echo "removed compose project $p"
  done
fi
# Temporary SoftHSM2 token directories of the custody tests.
rm -rf /tmp/rekey-softhsm-* /tmp/rekey_test_*-softhsm 2>/dev/null || true
