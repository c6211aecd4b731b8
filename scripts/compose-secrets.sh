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
default_pass = $rabbit"
else
  echo "$dir/rabbitmq_password exists; kept ($dir/rabbitmq.conf must hold the same password)"
fi
write grafana_admin_password "$(random)"

if [ "$(id -u)" = 0 ]; then
  chgrp 10001 "$dir"/* && chmod 0640 "$dir"/*
fi
