#!/usr/bin/env bash
# Quick start: installs what is missing, starts the real local stack (Kafka, Apicurio
# Registry, Cassandra, llama.cpp, Milvus Lite), builds Parley and runs all its services in
# the foreground. Prints the chat page's URL. Ctrl-C stops Parley; `infra/stack.sh stop`
# stops the stack.
#
# Only what chat needs is on the way to the chat page: Jaeger (traces) is built from the
# Go module proxy in the background at low priority and joins when ready; Parley is built
# in the dev profile the tests share (dependencies that do maths optimised, see
# Cargo.toml), while the stack starts. docs/operations.md says what the first run costs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

"$REPO_ROOT/infra/install.sh" --without-jaeger
if [[ ! -x "$JAEGER_BIN" ]]; then
  jaeger_log="$PARLEY_RUN/logs/jaeger-install.log"
  mkdir -p "$(dirname "$jaeger_log")"
  log "building Jaeger in the background (log: $jaeger_log); traces are kept once it has started"
  (nice -n 19 "$REPO_ROOT/infra/install.sh" --jaeger-only && "$REPO_ROOT/infra/stack.sh" start jaeger) \
    >"$jaeger_log" 2>&1 &
fi

log "building parley (dev profile) while the stack starts"
build_log="$PARLEY_RUN/logs/parley-build.log"
mkdir -p "$(dirname "$build_log")"
cargo build --locked --bin parley >"$build_log" 2>&1 &
build=$!
"$REPO_ROOT/infra/stack.sh" start
wait "$build" || { tail -n 30 "$build_log" >&2; die "building parley failed; see $build_log"; }

# A stable secret keeps the browser's user token valid across restarts.
secret_file="$PARLEY_CACHE/auth-secret"
[ -s "$secret_file" ] || (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret_file")
export PARLEY_AUTH_SECRET="${PARLEY_AUTH_SECRET:-$(cat "$secret_file")}"
export PARLEY_GATEWAY_LISTEN="${PARLEY_GATEWAY_LISTEN:-127.0.0.1:$GATEWAY_PORT}"
# A stable instance id: restarted after a crash, it takes its partitions back at once.
PARLEY_INSTANCE_ID="${PARLEY_INSTANCE_ID:-local}" exec "$CARGO_TARGET_DIR/debug/parley" all
