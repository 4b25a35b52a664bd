#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests and end-to-end tests against the real
# local stack (installed and started here if needed; stopped again if this script started it).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

"$REPO_ROOT/infra/install.sh"
if ! "$REPO_ROOT/infra/stack.sh" status | grep -q "stopped"; then
  log "reusing the running local stack"
else
  "$REPO_ROOT/infra/stack.sh" start
  trap '"$REPO_ROOT/infra/stack.sh" stop' EXIT
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo test (end-to-end tests use the stack at $PARLEY_KAFKA_BROKERS)"
PARLEY_REQUIRE_STACK=1 cargo test --workspace --locked
