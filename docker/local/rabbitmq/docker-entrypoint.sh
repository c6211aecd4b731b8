#!/bin/bash
# Runs the broker in the foreground as the rabbitmq user, node rabbit@<hostname>.
set -euo pipefail
if [ "${1:-rabbitmq-server}" != rabbitmq-server ]; then exec "$@"; fi
if [ "$(id -u)" = 0 ]; then
  mkdir -p /var/lib/rabbitmq /var/log/rabbitmq
  chown rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
fi
export RABBITMQ_NODENAME=${RABBITMQ_NODENAME:-rabbit@$(hostname -s)}
export RABBITMQ_LOGS=-
cd /var/lib/rabbitmq
if [ "$(id -u)" = 0 ]; then
  exec runuser -u rabbitmq -- /usr/lib/rabbitmq/bin/rabbitmq-server
fi
exec /usr/lib/rabbitmq/bin/rabbitmq-server
