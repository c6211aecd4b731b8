#!/usr/bin/env bash
# docker-compose.yml's topology as plain processes on this machine, with the same settings
# (for checking it where no container engine runs): a PostgreSQL and a RabbitMQ of their own
# (temporary directories, free ports, the password and credentials from secrets written by
# scripts/compose-secrets.sh, read through the same *_PASSWORD_FILE / MASTER_KEY_FILE
# variables), `rekey migrate`, three `rekey-worker` processes with the compose file's
# arguments, Prometheus with prometheus/alerts.yml if it is installed, and a coordinator that
# runs a staged rotation of ROWS seeded records with --metrics-addr. Then it checks every
# value, the audit log and (with Prometheus) a scraped figure, and stops everything.
#
#   scripts/topology.sh                     # binaries from target/release
#   BIN_DIR=target/debug ROWS=5000 scripts/topology.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
BIN_DIR=$(cd "${BIN_DIR:-$repo/target/release}" && pwd)
ROWS=${ROWS:-20000}
WORKERS=${WORKERS:-3}
work=$(mktemp -d /tmp/rekey-topology.XXXXXX)
chmod 755 "$work"
pids=()
log() { echo "[topology] $*"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
rabbit=${REKEY_RABBITMQ_SERVER:-/usr/lib/rabbitmq/bin/rabbitmq-server}
[ -x "$pgbin/initdb" ] || { echo "PostgreSQL server binaries not found under /usr/lib/postgresql" >&2; exit 1; }
[ -x "$rabbit" ] || { echo "RabbitMQ not found at $rabbit" >&2; exit 1; }
for b in rekey rekey-worker rekey-loadtest; do
  [ -x "$BIN_DIR/$b" ] || { echo "$BIN_DIR/$b not found: cargo build --release, or set BIN_DIR" >&2; exit 1; }
done

cleanup() {
  set +e
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  [ -n "${rabbit_pid:-}" ] && kill -TERM -- "-$rabbit_pid" 2>/dev/null && sleep 2 && kill -KILL -- "-$rabbit_pid" 2>/dev/null
  [ -d "$work/pg" ] && as_postgres "$pgbin/pg_ctl" -D "$work/pg" -m fast stop >/dev/null 2>&1
  if [ "${KEEP:-0}" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# Secrets, as for docker compose.
SECRETS_DIR="$work/secrets" "$repo/scripts/compose-secrets.sh" >/dev/null
secrets=$work/secrets

# PostgreSQL: user rekey, database rekey, password authentication over TCP.
pg_port=$(free_port)
install -m 0644 "$secrets/postgres_password" "$work/pgpass"
mkdir -p "$work/pg" "$work/pgrun"
[ "$(id -u)" = 0 ] && chown postgres "$work/pg" "$work/pgrun"
as_postgres "$pgbin/initdb" -D "$work/pg" -U rekey --pwfile="$work/pgpass" --auth-host=scram-sha-256 --auth-local=trust >"$work/initdb.log"
as_postgres "$pgbin/pg_ctl" -D "$work/pg" -l "$work/pgrun/pg.log" -o "-p $pg_port -k $work/pgrun -c listen_addresses=127.0.0.1" -w start >/dev/null
as_postgres "$pgbin/createdb" -h "$work/pgrun" -p "$pg_port" -U rekey rekey
log "PostgreSQL on 127.0.0.1:$pg_port"

# RabbitMQ: its own node, the compose file's credentials config.
mq_port=$(free_port); dist_port=$(free_port)
mkdir -p "$work/rabbit"
# The definitions (the coordinator's and the workers' users) from where the secrets are.
{ echo "listeners.tcp.local = 127.0.0.1:$mq_port"; cat "$repo/rabbitmq/10-rekey.conf"
  sed "s|/etc/rabbitmq/definitions.json|$secrets/rabbitmq-definitions.json|" "$secrets/rabbitmq.conf"; } >"$work/rabbit/rabbitmq.conf"
echo '[].' >"$work/rabbit/enabled_plugins"; : >"$work/rabbit/env.conf"
( cd "$work/rabbit" && exec setsid env HOME="$work/rabbit" RABBITMQ_CONF_ENV_FILE="$work/rabbit/env.conf" \
  RABBITMQ_NODENAME="rekey-topology-$$@localhost" RABBITMQ_NODE_PORT="$mq_port" RABBITMQ_DIST_PORT="$dist_port" \
  RABBITMQ_CONFIG_FILE="$work/rabbit/rabbitmq.conf" RABBITMQ_MNESIA_BASE="$work/rabbit/mnesia" \
  RABBITMQ_LOG_BASE="$work/rabbit/log" RABBITMQ_ENABLED_PLUGINS_FILE="$work/rabbit/enabled_plugins" \
  ERL_EPMD_ADDRESS=127.0.0.1 "$rabbit" >"$work/rabbit.log" 2>&1 ) &
rabbit_pid=$!
for _ in $(seq 1 240); do (echo >"/dev/tcp/127.0.0.1/$mq_port") 2>/dev/null && break; sleep 0.5; done
log "RabbitMQ on 127.0.0.1:$mq_port"

# The compose file's environment, pointed at these processes.
export REKEY_DATABASE_URL="postgres://rekey@127.0.0.1:$pg_port/rekey"
export REKEY_DATABASE_PASSWORD_FILE="$secrets/postgres_password"
# Each process connects to RabbitMQ as the compose file's service does: workers as
# rekey-worker, the coordinator as rekey-coordinator.
worker_amqp=(REKEY_AMQP_URL="amqp://rekey-worker@127.0.0.1:$mq_port/%2f" REKEY_AMQP_PASSWORD_FILE="$secrets/rabbitmq_worker_password")
export REKEY_AMQP_URL="amqp://rekey-coordinator@127.0.0.1:$mq_port/%2f"
export REKEY_AMQP_PASSWORD_FILE="$secrets/rabbitmq_coordinator_password"
export REKEY_MASTER_KEY_FILE="$secrets/master_key"
export REKEY_ALLOW_INSECURE_KEY_FILE=1     # as the compose file: its secrets are 0640 for group 10001
export REKEY_QUEUE_PREFIX=rekey
export REKEY_REPORTS_DIR="$work/reports"
export REKEY_BACKUP_CHECK=none
export RUST_LOG=${RUST_LOG:-warn}
unset REKEY_MASTER_KEY
export REKEY_CONFIG="$repo/examples/rekey.demo.toml"   # the demo's tables, as the compose coordinator's

"$BIN_DIR/rekey" migrate --demo >/dev/null
"$BIN_DIR/rekey" keys init >/dev/null
"$BIN_DIR/rekey-loadtest" seed --rows "$ROWS" >/dev/null
log "seeded $ROWS records"

worker_ports=()
for i in $(seq 1 "$WORKERS"); do
  port=$(free_port); worker_ports+=("$port")
  env "${worker_amqp[@]}" "$BIN_DIR/rekey-worker" --worker-id "worker-$i" --concurrency 2 --prefetch 4 --metrics-addr "127.0.0.1:$port" \
    2>"$work/worker-$i.log" &
  pids+=("$!")
done
log "$WORKERS workers (metrics on ${worker_ports[*]})"

coord_port=$(free_port)
prom_port=""
if command -v prometheus >/dev/null 2>&1; then
  prom_port=$(free_port)
  targets=$(printf '"127.0.0.1:%s",' "${worker_ports[@]}")
  cat >"$work/prometheus.yml" <<EOF
global: {scrape_interval: 2s, evaluation_interval: 2s}
rule_files: ["$repo/prometheus/alerts.yml"]
scrape_configs:
  - job_name: rekey-worker
    static_configs: [{targets: [${targets%,}]}]
  - job_name: rekey-coordinator
    static_configs: [{targets: ["127.0.0.1:$coord_port"]}]
EOF
  prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prom" \
    --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
  pids+=("$!")
  log "Prometheus on 127.0.0.1:$prom_port"
else
  log "Prometheus not installed: skipped"
fi

log "rotating (stages 1,100)"
"$BIN_DIR/rekey" rotate --stages 1,100 --observe 0 --auto-advance --key-propagation 2s \
  --metrics-addr "127.0.0.1:$coord_port" --metrics-linger 6s --json >"$work/rotate.json" 2>"$work/rotate.log" \
  || { echo "rekey rotate failed:"; tail -20 "$work/rotate.log"; exit 1; }
target=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["run"]["target_key_id"])' "$work/rotate.json")

"$BIN_DIR/rekey-loadtest" verify --expect-key "$target" >"$work/verify.txt" \
  || { echo "verification failed:"; cat "$work/verify.txt"; exit 1; }
log "verified: $(head -n1 "$work/verify.txt")"
"$BIN_DIR/rekey" audit verify >"$work/audit.txt" || { cat "$work/audit.txt"; exit 1; }
log "$(tail -n1 "$work/audit.txt")"

if [ -n "$prom_port" ]; then
  rotated=$(python3 - "$prom_port" <<'EOF'
import json, sys, urllib.request, urllib.parse
q = urllib.parse.quote("sum(rows_rotated_total)")
r = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/v1/query?query={q}"))
print(r["data"]["result"][0]["value"][1] if r["data"]["result"] else "none")
EOF
)
  log "Prometheus scraped sum(rows_rotated_total) = $rotated"
  [ "$rotated" != none ] || { echo "Prometheus scraped nothing"; exit 1; }
fi
log "the topology rotated and verified $ROWS records"
