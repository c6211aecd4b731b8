#!/bin/bash
# The official image's binary stores its data under data/ of its working directory
# (/prometheus) unless told otherwise; Debian's build defaults to /var/lib/prometheus.
# Keep the official behaviour when the command does not name a storage path.
set -euo pipefail
for a in "$@"; do
  case "$a" in --storage.tsdb.path*) exec /usr/bin/prometheus "$@" ;; esac
done
exec /usr/bin/prometheus "$@" --storage.tsdb.path=data/
