#!/usr/bin/env bash
# The dependency policy of deny.toml (licenses, bans, sources), checked offline by
# cargo-deny. Installs cargo-deny into ~/.cargo/bin the first time (a few minutes; later
# runs on the same machine reuse it). Advisories are not checked here: they need the
# RustSec database from GitHub (README, "Dependencies and advisories").
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.20.2
if ! cargo deny --version 2>/dev/null | grep -q "$version"; then
  echo "[deny] installing cargo-deny $version (once per machine)"
  # One retry: a registry hiccup should not fail the build.
  cargo install --locked --quiet cargo-deny --version "$version" ||
    { sleep 10; cargo install --locked --quiet cargo-deny --version "$version"; }
fi
# `cargo deny --offline` reads `cargo metadata`, which needs every locked package's
# manifest, those of other platforms too (wasm-bindgen, android_system_properties): fetch
# them first (crates.io is reachable; a machine that has them does nothing).
cargo fetch --locked --quiet ||
  { sleep 10; cargo fetch --locked --quiet; }
cargo deny --offline check bans licenses sources
