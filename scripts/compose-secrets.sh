#!/usr/bin/env bash
# Writes the secrets docker-compose.yml mounts, into ./secrets (git-ignored), once: an
# existing file is never overwritten (a new master key would make every wrapped key
# unreadable). The containers run as uid 10001: when run as root, the files are given to
# group 10001 with mode 0640; otherwise they are 0600 and you may need
# `sudo chgrp 10001 secrets/* && sudo chmod 0640 secrets/*` on a Linux host.
set -euo pipefail
cd "$(dirname "$0")/.."
# SECRETS_DIR: somewhere else than ./secrets (scripts/topology.sh uses a temporary one).
dir=${SECRETS_DIR:-secrets}
mkdir -p "$dir"
umask 077

random() { head -c 24 /dev/urandom | base64 | tr -d '/+=' ; }

write() {
  local name=$1 content=$2
  if [ -e "$dir/$name" ]; then
    echo "$dir/$name exists; kept"
    return
  fi
  printf '%s\n' "$content" > "$dir/$name"
  echo "wrote $dir/$name"
}

# 32 random bytes, base64: the master key (see `rekey keys new-master`).
write master_key "$(head -c 32 /dev/urandom | base64)"
write postgres_password "$(random)"
rabbit=$(random)
if [ ! -e "$dir/rabbitmq_password" ]; then
  write rabbitmq_password "$rabbit"
  write rabbitmq.conf "default_user = rekey
default_pass = $rabbit
load_definitions = /etc/rabbitmq/definitions.json"
else
  echo "$dir/rabbitmq_password exists; kept ($dir/rabbitmq.conf must hold the same password)"
fi
# The coordinator's and the workers' own RabbitMQ users, with the least permissions each
# needs (`rekey broker-users` prints the same definitions; loadtest/tests/it/deploy.rs
# checks that the two agree). The broker loads them at boot from rabbitmq-definitions.json,
# which holds salted SHA-256 hashes, never the passwords.
write rabbitmq_coordinator_password "$(random)"
write rabbitmq_worker_password "$(random)"
if [ ! -e "$dir/rabbitmq-definitions.json" ]; then
  python3 - "$dir" "${REKEY_QUEUE_PREFIX:-rekey}" >"$dir/rabbitmq-definitions.json" <<'EOF'
import base64, hashlib, json, os, sys
d, prefix = sys.argv[1], sys.argv[2]
def pw(name):
    with open(os.path.join(d, name)) as f:
        return f.readline().rstrip("\n")
def hashed(p):
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + p.encode()).digest()).decode()
def names(*qs):
    return "^(" + "|".join(q.replace(".", "\\.") for q in qs) + ")$"
b, dead, rep = prefix + ".batches", prefix + ".batches.dead", prefix + ".reports"
users = [
    ("rekey", "rabbitmq_password", ["administrator"], (".*", ".*", ".*")),
    ("rekey-coordinator", "rabbitmq_coordinator_password", [],
     (names(b, dead, rep), "^amq\\.default$", names(b, rep))),
    ("rekey-worker", "rabbitmq_worker_password", [], ("^$", "^amq\\.default$", names(b))),
]
print(json.dumps({
    "vhosts": [{"name": "/"}],
    "users": [{"name": u, "password_hash": hashed(pw(f)), "hashing_algorithm":
               "rabbit_password_hashing_sha256", "tags": t} for u, f, t, _ in users],
    "permissions": [{"user": u, "vhost": "/", "configure": c, "write": w, "read": r}
                    for u, _, _, (c, w, r) in users],
}, indent=2))
EOF
  echo "wrote $dir/rabbitmq-definitions.json"
else
  echo "$dir/rabbitmq-definitions.json exists; kept"
fi
write grafana_admin_password "$(random)"
# The Erlang cookie the nodes of docker-compose.cluster.yml share (any node with it may
# control the others: it is a secret like a password).
write erlang_cookie "$(random)$(random)"

if [ "$(id -u)" = 0 ]; then
  chgrp 10001 "$dir"/* && chmod 0640 "$dir"/*
fi
