# rekey's image: `rekey` (the operator CLI and coordinator), `rekey-worker` and
# `rekey-loadtest` in a small runtime that runs as a non-root user. TLS is rustls (no
# OpenSSL): the runtime needs only glibc and CA roots.
#
# Targets:
#   runtime (the default)  builds the binaries in a Rust image, then copies them in:
#                          `docker build -t rekey .` where a registry is reachable.
#   host                   copies binaries built on the host from ./bin of the build
#                          context (scripts/images.sh makes that context), for machines
#                          with no registry; RUNTIME_BASE names a local Debian bookworm image.
# The stages are in this order so that a builder without BuildKit, which builds every stage
# up to its target, builds only `runtime-base` and `host` for `--target host`.

ARG RUNTIME_BASE=debian:bookworm-slim

FROM ${RUNTIME_BASE} AS runtime-base
# ca-certificates: TLS to PostgreSQL, RabbitMQ and webhooks; fonts: the bench's chart.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/rekey --create-home rekey \
 && mkdir -p /var/lib/rekey/reports \
 && chown -R rekey:rekey /var/lib/rekey
USER 10001:10001
WORKDIR /var/lib/rekey
ENV REKEY_REPORTS_DIR=/var/lib/rekey/reports
# Worker and coordinator metrics (--metrics-addr).
EXPOSE 9464 9465
ENTRYPOINT ["rekey"]
CMD ["--help"]

FROM runtime-base AS host
COPY bin/ /usr/local/bin/

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin rekey --bin rekey-worker --bin rekey-loadtest \
 && mkdir -p /out \
 && cp target/release/rekey target/release/rekey-worker target/release/rekey-loadtest /out/

FROM runtime-base AS runtime
COPY --from=build /out/ /usr/local/bin/
