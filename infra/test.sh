#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests and end-to-end tests against the real
# local stack (installed and started here if needed; stopped again if this script started it).
set -euo pipefail
shopt -s inherit_errexit
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
results="$(mktemp)"
PARLEY_REQUIRE_STACK=1 cargo test --workspace --locked 2>&1 | tee "$results"
# cargo's last line is a doc-test summary of one crate; sum every suite into one line.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$results"
rm -f "$results"
