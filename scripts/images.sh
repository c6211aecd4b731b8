#!/usr/bin/env bash
# Builds, without any container registry, the images docker-compose.yml runs, from Debian's
# packages only:
#
#   rekey-local/debian:bookworm     debootstrap (minbase) into a directory, `docker import`
#   rekey-local/postgres:15         stand-in for postgres:15            (docker/local/postgres)
#   rekey-local/rabbitmq:3          stand-in for rabbitmq:3.13-management (docker/local/rabbitmq)
#   rekey-local/prometheus:2        stand-in for prom/prometheus         (docker/local/prometheus)
#   rekey:local                     the Dockerfile's `host` target: binaries built on this host
#
# The stand-ins keep the interface docker-compose.yml uses (environment variables, secret
# files, ports, health-check commands), not the official images' every feature. Run the
# compose file with them by exporting what `scripts/images.sh --env` prints.
#
#   scripts/images.sh                       # base and stand-ins (cached), rekey:local from target/release
#   BIN_DIR=target/debug scripts/images.sh  # rekey:local from a debug build
#   scripts/images.sh --env                 # only print the variables that select these images
#   FORCE=1 scripts/images.sh               # rebuild the base image too
#
# Caching: the base image is built once per machine (docker keeps it; FORCE=1 rebuilds it),
# the stand-ins through docker's build cache, rekey:local whenever the binaries changed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
BASE=${REKEY_BASE_IMAGE:-rekey-local/debian:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { echo "[images] $*" >&2; }

print_env() {
  cat <<EOF
REKEY_IMAGE=rekey:local
POSTGRES_IMAGE=rekey-local/postgres:15
RABBITMQ_IMAGE=rekey-local/rabbitmq:3
PROMETHEUS_IMAGE=rekey-local/prometheus:2
EOF
}
if [ "${1:-}" = "--env" ]; then print_env; exit 0; fi

docker info >/dev/null 2>&1 || { echo "no Docker engine answers (docker info failed)" >&2; exit 2; }
start=$(date +%s)

# --- the base image -------------------------------------------------------------------
if [ "${FORCE:-0}" = 1 ] || ! docker image inspect "$BASE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || {
    if [ "$(id -u)" = 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
    else
      echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1
    fi
  }
  root=$(mktemp -d /tmp/rekey-base.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  log "debootstrap bookworm (minbase) from $MIRROR"
  t0=$(date +%s)
  debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; exit 1; }
  rm -f "$root.log"
  cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
  # Like the official debian images: no recommends, no docs, no apt caches kept.
  cat >"$root/etc/apt/apt.conf.d/90rekey-image" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
  cat >"$root/etc/dpkg/dpkg.cfg.d/90rekey-image" <<'EOF'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
  tar -C "$root" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase bookworm $MIRROR (scripts/images.sh)" \
    - "$BASE" >/dev/null
  rm -rf "$root"
  trap - EXIT
  log "base image $BASE built in $(($(date +%s) - t0)) s"
else
  log "base image $BASE cached"
fi

# --- the stand-ins (docker's build cache) ---------------------------------------------
build() {
  local tag=$1 dir=$2
  local t0
  t0=$(date +%s)
  DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$BASE" -t "$tag" "$dir" >/dev/null \
    || { echo "docker build of $tag failed (docker build --build-arg BASE=$BASE $dir)" >&2; exit 1; }
  log "$tag ready in $(($(date +%s) - t0)) s"
}
build rekey-local/postgres:15 "$repo/docker/local/postgres"
build rekey-local/rabbitmq:3 "$repo/docker/local/rabbitmq"
build rekey-local/prometheus:2 "$repo/docker/local/prometheus"

# --- rekey:local: the Dockerfile's `host` target, binaries from this host --------------
BIN_DIR=${BIN_DIR:-$repo/target/release}
ctx=$(mktemp -d /tmp/rekey-image.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin"
for b in rekey rekey-worker rekey-loadtest; do
  [ -x "$BIN_DIR/$b" ] || { echo "$BIN_DIR/$b not found: cargo build (--release), or set BIN_DIR" >&2; exit 1; }
  # Debug builds carry hundreds of MB of symbols that the image does not need.
  objcopy --strip-debug "$BIN_DIR/$b" "$ctx/bin/$b"
done
cp "$repo/Dockerfile" "$ctx/Dockerfile"
t0=$(date +%s)
DOCKER_BUILDKIT=0 docker build -q --target host --build-arg "RUNTIME_BASE=$BASE" -t rekey:local "$ctx" >/dev/null \
  || { echo "docker build --target host of rekey:local failed" >&2; exit 1; }
log "rekey:local ready in $(($(date +%s) - t0)) s (binaries from $BIN_DIR)"
log "all images ready in $(($(date +%s) - start)) s"
