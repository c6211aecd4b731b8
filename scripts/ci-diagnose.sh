#!/usr/bin/env bash
# What the machine looked like when .ci/run failed: the services' state, their resource
# alarms, leftovers and the machine's load, so that a failure seen only in CI can be
# understood from its log. Prints; changes nothing.
set +e
echo "=== ci-diagnose: $(date -u +%FT%TZ) ==="
uptime
free -m
df -h / /tmp /var/lib 2>/dev/null
echo "--- processes using the most CPU (names only: other processes' arguments may hold secrets)"
ps -eo pid,ppid,pcpu,pmem,etime,comm --sort=-pcpu | head -15
echo "--- rekey processes still running"
pgrep -af 'rekey|target/debug' | cut -c1-200 | head -20
echo "--- RabbitMQ"
rabbitmq-diagnostics -n rabbit@localhost -q alarms 2>&1 | head -20
rabbitmq-diagnostics -n rabbit@localhost -q memory_breakdown 2>&1 | head -15
echo "queues: $(rabbitmqctl -n rabbit@localhost -q list_queues name 2>/dev/null | wc -l)"
rabbitmqctl -n rabbit@localhost -q list_connections name state 2>&1 | head -20
echo "--- PostgreSQL"
psql -h 127.0.0.1 -U postgres -d postgres -Atc \
  "SELECT datname, state, count(*) FROM pg_stat_activity GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 15" 2>&1
psql -h 127.0.0.1 -U postgres -d postgres -Atc \
  "SELECT count(*) || ' test databases left' FROM pg_database WHERE datname LIKE 'rekey_test_%'" 2>&1
echo "=== ci-diagnose end ==="
