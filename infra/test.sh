#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests and end-to-end tests against the real
# local stack (installed and started here if needed; stopped again if this script started it).
set -euo pipefail
shopt -s inherit_errexit
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

"$REPO_ROOT/infra/install.sh" --with-browser --with-metrics --with-lint
# A full disk shows up as brokers timing out, not as an error of its own: say so first.
free_gib=$(df -Pk "$PARLEY_CACHE" | awk 'NR == 2 { print int($4 / 1048576) }')
((free_gib >= 8)) || log "warning: only ${free_gib} GiB free under $PARLEY_CACHE; the build and the stack need about 8"
# A stack that was fully up before stays up afterwards; `start` still probes every service
# and restarts any that is up but does not answer, so a wedged leftover never fails the run.
# (The status is read whole first: with pipefail, `grep -q` closing the pipe early could
# fail the status command with SIGPIPE and leave a stack this script started running.)
stack_status=$("$REPO_ROOT/infra/stack.sh" status)
if grep -q "stopped" <<<"$stack_status"; then
  trap '"$REPO_ROOT/infra/stack.sh" stop' EXIT
else
  log "reusing the running local stack after probing it"
fi
"$REPO_ROOT/infra/stack.sh" start

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo doc (broken or private intra-doc links are errors)"
cargo doc --workspace --no-deps --locked --quiet
log "shellcheck"
"$VENV/bin/shellcheck" infra/*.sh .ci/run
log "Kubernetes manifests against the API's and KEDA's schemas"
"$VENV/bin/python" infra/validate_manifests.py "$KUBERNETES_VERSION" "$KEDA_CRD_DIR" k8s
# Every version of every schema in catalog order, as a deployment registers them first: a
# registry whose first writer was a test or a bench would hold only the versions it wrote.
log "registering the schema catalog"
cargo run --quiet --locked -- schemas register >/dev/null
log "cargo test (end-to-end tests use the stack at $PARLEY_KAFKA_BROKERS)"
results="$(mktemp)"
# Every suite runs even when one fails, so a red run shows all that is wrong at once.
status=0
PARLEY_REQUIRE_STACK=1 cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$results" || status=$?
# cargo's last line is a doc-test summary of one crate; sum every suite into one line.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$results"
rm -f "$results"
if ((status != 0)); then
  # What a failed run needs to be understood from its output alone: the machine and the stack.
  log "tests failed; disk, stack and the end of each service log follow"
  df -h "$PARLEY_CACHE" /tmp >&2 || true
  "$REPO_ROOT/infra/stack.sh" status >&2 || true
  for service_log in "$PARLEY_RUN"/logs/*.log; do
    printf '\n--- %s (last 15 lines)\n' "$service_log" >&2
    tail -n 15 "$service_log" >&2 || true
  done
  exit "$status"
fi
