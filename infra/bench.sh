#!/usr/bin/env bash
# Runs a benchmark against the real local stack (started if needed, left running).
#   infra/bench.sh pipeline_latency|projection|knowledge|crowd|prompt_cache|short_after_long|faults|cancel|semantic_cache
#   infra/bench.sh vector_indexes   (starts Milvus Lite servers of its own; no stack)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
"$REPO_ROOT/infra/install.sh"
if [[ "${1:-}" == vector_indexes ]]; then
  export PARLEY_MILVUS_LITE="$VENV/bin/milvus-lite"
  exec cargo bench --locked --bench vector_indexes
fi
"$REPO_ROOT/infra/stack.sh" start
# The naive Python reference design the latency benchmark compares with.
"$VENV/bin/python" -c 'import confluent_kafka, websockets, openai' 2>/dev/null \
  || "$VENV/bin/pip" install -q confluent-kafka websockets openai
export PARLEY_PYTHON="$VENV/bin/python"
# Where the stack keeps its pid files: a benchmark says how long ago the stack started.
export PARLEY_RUN
# The crowd benchmark holds thousands of sockets on both ends (this shell's children).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ "${1:-}" == crowd ]] && ((EUID == 0)); then ulimit -n 1048576 2>/dev/null || true; fi
exec cargo bench --locked --bench "${1:?usage: infra/bench.sh <bench name>}"
