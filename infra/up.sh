#!/usr/bin/env bash
# Quick start: installs what is missing, starts the real local stack (Kafka, Apicurio
# Registry, llama.cpp), builds Parley and runs all its services in the foreground.
# Prints the chat page's URL. Ctrl-C stops Parley; `infra/stack.sh stop` stops the stack.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

"$REPO_ROOT/infra/install.sh"
"$REPO_ROOT/infra/stack.sh" start
log "building parley (release)"
cargo build --release --locked --bin parley

# A stable secret keeps the browser's user token valid across restarts.
secret_file="$PARLEY_CACHE/auth-secret"
[ -s "$secret_file" ] || (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret_file")
export PARLEY_AUTH_SECRET="${PARLEY_AUTH_SECRET:-$(cat "$secret_file")}"
export PARLEY_GATEWAY_LISTEN="${PARLEY_GATEWAY_LISTEN:-127.0.0.1:$GATEWAY_PORT}"
# A stable instance id: restarted after a crash, it takes its partitions back at once.
PARLEY_INSTANCE_ID="${PARLEY_INSTANCE_ID:-local}" exec "$CARGO_TARGET_DIR/release/parley" all
