#!/usr/bin/env bash
# The services rekey's demo and tests need, on a Debian machine: installs what is missing from
# Debian's packages, makes PostgreSQL answer on 127.0.0.1:5432 to user `postgres` and RabbitMQ
# on 127.0.0.1:5672 (guest/guest, which RabbitMQ allows from loopback only), waits until both
# answer, and says what it did. Idempotent: a second run changes nothing and says so.
#
#   scripts/setup.sh
#
# PostgreSQL: a server that already answers on 127.0.0.1:5432 is used as it is, never
# reconfigured (when it refuses user postgres, this says so and stops). Otherwise the script
# uses a cluster of its own, `<version>/rekey` (pg_createcluster; pg_lsclusters shows it),
# created on first use with `trust` authentication for TCP connections from 127.0.0.1 and ::1:
# any local process may then connect as any role, the superuser included, without a password.
# That is what a development or CI machine wants and never what a shared or production server
# may have. Other clusters on the machine (Debian's `main`, say) are left as they are.
#
# RabbitMQ: a broker that answers on 127.0.0.1:5672 is used as it is; otherwise the node of
# Debian's package is started as rabbit@localhost, bound to 127.0.0.1.
#
# Packages, when missing: postgresql, postgresql-client, rabbitmq-server, prometheus (for
# promtool; the tests check the alert rules with it and scrape with it), fonts-dejavu-core (the
# bench's chart), python3, softhsm2 (a PKCS#11 token for the key-custody tests), debootstrap
# (the compose tests' base image). Services are kept from starting while they are installed
# (policy-rc.d), and Debian's automatic `main` cluster is not created when this script installs
# PostgreSQL, so that nothing but the two services above is left running.
set -euo pipefail

PG_PORT=5432
MQ_PORT=5672
CLUSTER=rekey
PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
started_at=$(date +%s)
changes=()

say() { echo "[setup] $*"; }
did() { changes+=("$1"); say "$1"; }
die() { echo "[setup] error: $*" >&2; exit 1; }

if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  sudo=()
fi
as_root() { "${sudo[@]}" "$@"; }

# --- packages ----------------------------------------------------------------------------
pg_server_installed() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v pg_createcluster >/dev/null 2>&1; }

missing=()
pg_server_installed || missing+=(postgresql)
command -v psql >/dev/null 2>&1 && command -v pg_isready >/dev/null 2>&1 || missing+=(postgresql-client)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
[ -f /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null 2>&1 || missing+=(softhsm2)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)

if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 ||
    die "missing ${missing[*]} and this is not a Debian-like machine (no apt-get): install them by hand"
  [ "$(id -u)" = 0 ] || [ ${#sudo[@]} -gt 0 ] ||
    die "missing ${missing[*]}: run this as root (or with sudo available) to install them"
  say "installing ${missing[*]} from Debian's packages…"
  # Keep package scripts from starting services (prometheus, a `main` cluster) we did not ask for.
  policy_made=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod 755 /usr/sbin/policy-rc.d
    policy_made=1
  fi
  nomain=/etc/postgresql-common/createcluster.d/zz-rekey-setup-no-main.conf
  nomain_made=0
  if ! pg_server_installed && [ ! -e "$nomain" ]; then
    as_root mkdir -p "$(dirname "$nomain")"
    echo "create_main_cluster = off" | as_root tee "$nomain" >/dev/null
    nomain_made=1
  fi
  restore() {
    [ "$policy_made" = 1 ] && as_root rm -f /usr/sbin/policy-rc.d
    [ "$nomain_made" = 1 ] && as_root rm -f "$nomain"
    return 0
  }
  trap restore EXIT
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confold "${missing[@]}" >/tmp/rekey-setup-apt.log 2>&1 ||
    { tail -n 30 /tmp/rekey-setup-apt.log >&2; die "apt-get install ${missing[*]} failed (log: /tmp/rekey-setup-apt.log)"; }
  restore
  trap - EXIT
  did "installed ${missing[*]}"
else
  say "packages: postgresql, rabbitmq-server, prometheus, fonts-dejavu-core, python3, softhsm2, debootstrap already installed"
fi

# --- PostgreSQL --------------------------------------------------------------------------
pg_answers() { pg_isready -h 127.0.0.1 -p "$PG_PORT" -q; }
pg_login() { psql -w "$PG_URL" -XAtqc 'SELECT 1' 2>&1; }
# The clusters postgresql-common knows, as "version name port status" lines.
clusters() { pg_lsclusters -h 2>/dev/null | awk '{print $1, $2, $3, $4}'; }

if pg_answers; then
  if out=$(pg_login); then
    say "PostgreSQL already answers on 127.0.0.1:$PG_PORT and lets user postgres in: left as it is"
  else
    owner=$(clusters | awk -v p="$PG_PORT" '$3 == p && $4 == "online" {print $1 "/" $2}' | head -n1)
    die "PostgreSQL on 127.0.0.1:$PG_PORT${owner:+ (cluster $owner)} answers but refuses $PG_URL: ${out}
  This script does not reconfigure a server it did not set up. Either stop that server so that
  the development cluster can take the port${owner:+ (pg_ctlcluster ${owner%/*} ${owner#*/} stop)}, then run this again,
  or point rekey at a user it accepts: REKEY_DATABASE_URL for the demo, REKEY_TEST_DATABASE_URL for the tests."
  fi
else
  ours=$(clusters | awk -v c="$CLUSTER" '$2 == c {print $1}' | sort -V | tail -n1)
  if [ -z "$ours" ]; then
    version=$(ls -d /usr/lib/postgresql/*/bin/initdb | sed 's#/usr/lib/postgresql/\([^/]*\)/.*#\1#' | sort -V | tail -n1)
    others=$(clusters | awk -v p="$PG_PORT" '$3 == p {print $1 "/" $2}' | tr '\n' ' ')
    # trust on loopback TCP (development only, see the top of this file); peer on the socket.
    as_root pg_createcluster "$version" "$CLUSTER" --port "$PG_PORT" --start-conf manual \
      -- --auth-host=trust --auth-local=peer >/tmp/rekey-setup-pg.log 2>&1 ||
      { cat /tmp/rekey-setup-pg.log >&2; die "pg_createcluster $version $CLUSTER failed"; }
    ours=$version
    did "created PostgreSQL cluster $ours/$CLUSTER on port $PG_PORT (trust for 127.0.0.1 and ::1: a development cluster)"
    [ -z "$others" ] ||
      say "note: ${others}is also set to port $PG_PORT; it was left alone (stopped), and only one of them can run at a time"
  fi
  as_root pg_ctlcluster "$ours" "$CLUSTER" start >/tmp/rekey-setup-pg.log 2>&1 ||
    { cat /tmp/rekey-setup-pg.log >&2; die "pg_ctlcluster $ours $CLUSTER start failed (its log: /var/log/postgresql/postgresql-$ours-$CLUSTER.log)"; }
  for _ in $(seq 1 60); do pg_answers && break; sleep 1; done
  pg_answers || die "PostgreSQL cluster $ours/$CLUSTER did not answer on 127.0.0.1:$PG_PORT within 60 s (its log: /var/log/postgresql/postgresql-$ours-$CLUSTER.log)"
  out=$(pg_login) || die "PostgreSQL cluster $ours/$CLUSTER answers but refuses $PG_URL: $out"
  did "started PostgreSQL cluster $ours/$CLUSTER on 127.0.0.1:$PG_PORT"
fi

# --- RabbitMQ ----------------------------------------------------------------------------
# True when something on the port answers the AMQP 0-9-1 protocol header with a frame.
mq_answers() {
  timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$MQ_PORT && printf 'AMQP\\x00\\x00\\x09\\x01' >&3 &&
    [ \"\$(head -c 1 <&3 | od -An -tx1 | tr -d ' ')\" = 01 ]" 2>/dev/null
}

if mq_answers; then
  say "RabbitMQ already answers on 127.0.0.1:$MQ_PORT: left as it is"
else
  # Bound to loopback: the node's AMQP listener, Erlang's port mapper and its distribution
  # port; named rabbit@localhost, since the machine's host name may resolve to an address
  # the port mapper does not listen on (a container's does). `rabbitmqctl -n rabbit@localhost`.
  # rekey's broker settings (the largest message accepted): rabbitmq/10-rekey.conf.
  as_root install -D -m 0644 "$(dirname "$0")/../rabbitmq/10-rekey.conf" /etc/rabbitmq/conf.d/10-rekey.conf
  as_root env RABBITMQ_NODENAME=rabbit@localhost \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    rabbitmq-server -detached >/tmp/rekey-setup-rabbitmq.log 2>&1 ||
    { cat /tmp/rekey-setup-rabbitmq.log >&2; die "rabbitmq-server -detached failed"; }
  for _ in $(seq 1 120); do mq_answers && break; sleep 1; done
  mq_answers || die "RabbitMQ did not answer on 127.0.0.1:$MQ_PORT within 120 s (its logs: /var/log/rabbitmq/)"
  did "started RabbitMQ node rabbit@localhost on 127.0.0.1:$MQ_PORT"
fi

elapsed=$(($(date +%s) - started_at))
if [ ${#changes[@]} -eq 0 ]; then
  say "nothing changed: everything was installed and both services already answered (${elapsed} s)"
else
  say "done in ${elapsed} s: PostgreSQL at $PG_URL, RabbitMQ at amqp://guest:guest@127.0.0.1:$MQ_PORT/%2f"
fi
