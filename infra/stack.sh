#!/usr/bin/env bash
# Starts, stops or reports the real local stack on 127.0.0.1: Kafka (KRaft), Apicurio
# Registry, Cassandra (the CQL store standing in for ScyllaDB), llama.cpp, Milvus Lite and
# Jaeger. `start` reuses services that are up and answering (and restarts any that are up
# but not answering), so tests can call it freely. Data and logs live under $PARLEY_RUN;
# pids in $PARLEY_RUN/pids.
#   infra/stack.sh start|stop|status [service...]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
mkdir -p "$PARLEY_RUN/logs" "$PARLEY_RUN/pids"

# Health probes ask each service a real question, each bounded in time: a process that is
# alive but frozen or wedged (it happened: a stack left stopped by an ended session, reused
# by the next test run) must read as unhealthy, not hang the probe or pass a port check.
kafka_port_healthy() { timeout 30 java -cp "$PARLEY_CACHE/kafka-$KAFKA_VERSION/libs/*" \
  org.apache.kafka.tools.BrokerApiVersionsCommand --bootstrap-server "127.0.0.1:$1" >/dev/null 2>&1; }
kafka_healthy() { kafka_port_healthy "$KAFKA_PORT"; }
kafka1_healthy() { kafka_port_healthy "$(kafka_node_port 1)"; }
kafka2_healthy() { kafka_port_healthy "$(kafka_node_port 2)"; }
kafka3_healthy() { kafka_port_healthy "$(kafka_node_port 3)"; }
registry_healthy() { curl -sf --max-time 5 "http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7/subjects" >/dev/null; }
# A CQL v4 OPTIONS request; a live node answers SUPPORTED (response version 0x84, opcode 0x06).
cassandra_healthy() {
  # shellcheck disable=SC2016 # the inner shell expands $1, the port passed after it
  [ "$(timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"; printf "\x04\x00\x00\x00\x05\x00\x00\x00\x00" >&3; head -c 5 <&3' \
    _ "$CQL_PORT" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 8400000006 ]
}
llm_healthy() { curl -sf --max-time 5 "http://127.0.0.1:$LLM_PORT/health" >/dev/null; }
llm2_healthy() { curl -sf --max-time 5 "http://127.0.0.1:$LLM2_PORT/health" >/dev/null; }
jaeger_healthy() { curl -sf --max-time 5 "http://127.0.0.1:$JAEGER_HEALTH_PORT/status" >/dev/null; }
prometheus_healthy() { curl -sf --max-time 5 "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" >/dev/null; }
milvus_healthy() { timeout 20 "$VENV/bin/python" -c 'import sys; from pymilvus import MilvusClient
MilvusClient(sys.argv[1], timeout=10).list_collections()' "http://127.0.0.1:$MILVUS_PORT" >/dev/null 2>&1; }

# Kafka runs as one KRaft node ("kafka", the default) or, with PARLEY_KAFKA_NODES=3, as a
# cluster of three combined broker+controller nodes ("kafka1".."kafka3") on 127.0.0.1:
# node N listens on KAFKA_PORT+2(N-1) and its controller on the port after. The cluster
# replicates Kafka's own topics (offsets, transactions) three times with min.insync 2, so
# losing one node loses nothing; `parley` creates its topics the same way on it.
kafka_node_port() { echo $((KAFKA_PORT + 2 * ($1 - 1))); }

start_kafka_node() {
  local name=$1 node=$2 nodes=$3
  local port; port=$(kafka_node_port "$node")
  local data="$PARLEY_RUN/$name-data" conf="$PARLEY_RUN/$name.properties"
  local quorum controller=$((port + 1)) format_mode="--standalone" voters=() i
  # One node formats itself as a standalone controller (dynamic quorum); a cluster names
  # its three voters.
  if ((nodes == 1)); then
    controller=$KAFKA_CONTROLLER_PORT
    quorum="controller.quorum.bootstrap.servers=127.0.0.1:$controller"
  else
    for ((i = 1; i <= nodes; i++)); do voters+=("$i@127.0.0.1:$(($(kafka_node_port "$i") + 1))"); done
    quorum="controller.quorum.voters=$(IFS=,; echo "${voters[*]}")" format_mode=""
  fi
  local replicas=$((nodes >= 3 ? 3 : 1)) min_isr=$((nodes >= 3 ? 2 : 1))
  cat >"$conf" <<CONF
process.roles=broker,controller
node.id=$node
$quorum
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$data
num.partitions=6
auto.create.topics.enable=false
default.replication.factor=$replicas
min.insync.replicas=$min_isr
offsets.topic.replication.factor=$replicas
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=$replicas
transaction.state.log.min.isr=$min_isr
transaction.state.log.num.partitions=6
share.coordinator.state.topic.replication.factor=$replicas
share.coordinator.state.topic.min.isr=$min_isr
group.initial.rebalance.delay.ms=0
CONF
  local cp="$PARLEY_CACHE/kafka-$KAFKA_VERSION/libs/*"
  if [ ! -f "$data/meta.properties" ]; then
    # Every node of a cluster is formatted with the same cluster id.
    local cluster_id_file="$PARLEY_RUN/kafka-cluster-id-$nodes"
    [ -f "$cluster_id_file" ] || java -cp "$cp" kafka.tools.StorageTool random-uuid >"$cluster_id_file"
    # shellcheck disable=SC2086 # format_mode is one flag or none
    java -cp "$cp" kafka.tools.StorageTool format -t "$(cat "$cluster_id_file")" -c "$conf" $format_mode \
      >"$PARLEY_RUN/logs/$name-format.log" 2>&1 \
      || die "formatting Kafka storage failed; see $PARLEY_RUN/logs/$name-format.log"
  fi
  log "starting Kafka $KAFKA_VERSION ($name) on 127.0.0.1:$port"
  local heap=$((nodes >= 3 ? 512 : 1024))
  nohup java -Xms256m -Xmx${heap}m -XX:+UseG1GC -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
    -cp "$cp" kafka.Kafka "$conf" >"$PARLEY_RUN/logs/$name.log" 2>&1 &
  record_pid $! "$PARLEY_RUN/pids/$name.pid"
}
start_kafka() { start_kafka_node kafka 1 1; }
start_kafka1() { start_kafka_node kafka1 1 3; }
start_kafka2() { start_kafka_node kafka2 2 3; }
start_kafka3() { start_kafka_node kafka3 3 3; }

start_registry() {
  local pidf="$PARLEY_RUN/pids/registry.pid"
  local java21
  java21=$(java_at_least 21) || die "Apicurio Registry $APICURIO_VERSION needs Java 21+; none found (set PARLEY_JAVA21=/path/to/java)"
  log "starting Apicurio Registry $APICURIO_VERSION on 127.0.0.1:$REGISTRY_PORT"
  # H2 file storage keeps schema ids stable across registry restarts (ids are in every message).
  nohup "$java21" -Xms128m -Xmx512m -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$REGISTRY_PORT" \
    -Dapicurio.storage.kind=sql -Dapicurio.storage.sql.kind=h2 \
    -Dquarkus.datasource.jdbc.url="jdbc:h2:file:$PARLEY_RUN/registry-data/registry" \
    -Dapicurio.ccompat.legacy-id-mode.enabled=true \
    -jar "$PARLEY_CACHE/apicurio-$APICURIO_VERSION/quarkus-run.jar" >"$PARLEY_RUN/logs/registry.log" 2>&1 &
  record_pid $! "$pidf"
}

start_cassandra() {
  local pidf="$PARLEY_RUN/pids/cassandra.pid" data="$PARLEY_RUN/cassandra-data" conf="$PARLEY_RUN/cassandra.yaml"
  mkdir -p "$data"
  sed -e "s|@DATA@|$data|g" -e "s|@STORAGE_PORT@|$CASSANDRA_STORAGE_PORT|g" -e "s|@CQL_PORT@|$CQL_PORT|g" \
    "$REPO_ROOT/infra/cassandra/cassandra.yaml.template" >"$conf"
  local java17
  java17=$(command -v java)
  log "starting Cassandra $CASSANDRA_VERSION (CQL) on 127.0.0.1:$CQL_PORT"
  # shellcheck disable=SC2046 # one JVM flag per line in the options file
  nohup "$java17" $(grep -v '^#' "$REPO_ROOT/infra/cassandra/jvm17.options") -Xms512m -Xmx1g \
    -Dcassandra-foreground=yes -Dcassandra.config="file://$conf" -Dcassandra.storagedir="$data" \
    -Dcassandra.logdir="$PARLEY_RUN/logs" -Dlogback.configurationFile="$REPO_ROOT/infra/cassandra/logback.xml" \
    -Dcassandra.jmx.local.port="$CASSANDRA_JMX_PORT" -Dcassandra.skip_wait_for_gossip_to_settle=0 -Dcassandra.ring_delay_ms=100 \
    -cp "$PARLEY_CACHE/cassandra-$CASSANDRA_VERSION/libs/*" org.apache.cassandra.service.CassandraDaemon \
    >"$PARLEY_RUN/logs/cassandra.log" 2>&1 &
  record_pid $! "$pidf"
}

# start_model_server NAME PORT: a llama.cpp server with SmolLM2-135M-Instruct.
start_model_server() {
  log "starting llama.cpp (SmolLM2-135M-Instruct) as $1 on 127.0.0.1:$2"
  nohup "$VENV/bin/python" "$REPO_ROOT/infra/llm_server.py" --model "$LLM_MODEL" --port "$2" \
    >"$PARLEY_RUN/logs/$1.log" 2>&1 &
  record_pid $! "$PARLEY_RUN/pids/$1.pid"
}
start_llm() { start_model_server llm "$LLM_PORT"; }

start_llm2() { start_model_server llm2 "$LLM2_PORT"; }

start_milvus() {
  local pidf="$PARLEY_RUN/pids/milvus.pid"
  log "starting Milvus Lite $MILVUS_LITE_VERSION on 127.0.0.1:$MILVUS_PORT"
  nohup "$VENV/bin/milvus-lite" server --data-dir "$PARLEY_RUN/milvus-data" --host 127.0.0.1 --port "$MILVUS_PORT" \
    >"$PARLEY_RUN/logs/milvus.log" 2>&1 &
  record_pid $! "$pidf"
}

start_jaeger() {
  local pidf="$PARLEY_RUN/pids/jaeger.pid" conf="$PARLEY_RUN/jaeger.yaml"
  sed -e "s|@OTLP_PORT@|$JAEGER_OTLP_PORT|g" -e "s|@QUERY_PORT@|$JAEGER_QUERY_PORT|g" \
    -e "s|@QUERY_GRPC_PORT@|$JAEGER_QUERY_GRPC_PORT|g" -e "s|@HEALTH_PORT@|$JAEGER_HEALTH_PORT|g" \
    "$REPO_ROOT/infra/jaeger/config.yaml.template" >"$conf"
  log "starting Jaeger (OTLP in on 127.0.0.1:$JAEGER_OTLP_PORT, query API on 127.0.0.1:$JAEGER_QUERY_PORT)"
  # Jaeger traces its own query API to an OTLP/gRPC endpoint nobody listens on here; each
  # export then times out (and its stop waits up to 10 s for the last one): sample nothing.
  OTEL_TRACES_SAMPLER=always_off nohup "$JAEGER_BIN" --config "$conf" >"$PARLEY_RUN/logs/jaeger.log" 2>&1 &
  record_pid $! "$pidf"
}

start_prometheus() {
  local pidf="$PARLEY_RUN/pids/prometheus.pid" conf="$PARLEY_RUN/prometheus.yml"
  mkdir -p "$PARLEY_PROMETHEUS_TARGETS"
  sed -e "s|@RULES@|$REPO_ROOT/infra/prometheus/rules.yml|g" -e "s|@GATEWAY_PORT@|$GATEWAY_PORT|g" \
    -e "s|@TARGETS@|$PARLEY_PROMETHEUS_TARGETS|g" "$REPO_ROOT/infra/prometheus/prometheus.yml.template" >"$conf"
  log "starting Prometheus on 127.0.0.1:$PROMETHEUS_PORT (scrapes 127.0.0.1:$GATEWAY_PORT and $PARLEY_PROMETHEUS_TARGETS/*.json)"
  nohup "$PROMETHEUS_BIN" --config.file="$conf" --storage.tsdb.path="$PARLEY_RUN/prometheus-data" \
    --storage.tsdb.retention.time=2d --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
    >"$PARLEY_RUN/logs/prometheus.log" 2>&1 &
  record_pid $! "$pidf"
}

stop_one() {
  local name=$1 pidf="$PARLEY_RUN/pids/$1.pid"
  if pid_alive "$pidf"; then
    local pid; pid=$(pid_of "$pidf")
    log "stopping $name (pid $pid)"
    # CONT first: a stopped process would hold a TERM until it is resumed.
    kill -CONT "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do running "$pid" || break; sleep 0.2; done
    running "$pid" && kill -9 "$pid"
  fi
  rm -f "$pidf"
}

# PARLEY_KAFKA_NODES=3: Kafka as a three-node cluster instead of one node. Stop and status
# cover whichever of the two ran (their pid files say).
case "${PARLEY_KAFKA_NODES:-1}" in
  1) KAFKA_SERVICES=(kafka) ;;
  3) KAFKA_SERVICES=(kafka1 kafka2 kafka3) ;;
  *) die "PARLEY_KAFKA_NODES=${PARLEY_KAFKA_NODES}: expected 1 or 3" ;;
esac
if [[ "${1:-}" != start ]]; then
  for other in kafka kafka1 kafka2 kafka3; do
    if [[ -f "$PARLEY_RUN/pids/$other.pid" && " ${KAFKA_SERVICES[*]} " != *" $other "* ]]; then KAFKA_SERVICES+=("$other"); fi
  done
fi
SERVICES=("${KAFKA_SERVICES[@]}" registry cassandra llm milvus)
# The trace collector: started once installed (the quick start builds it in the background
# and starts it when it is ready), always stopped and shown.
if [[ -x "$JAEGER_BIN" || -f "$PARLEY_RUN/pids/jaeger.pid" ]]; then
  SERVICES+=(jaeger)
fi
# The metrics server: started once installed (`infra/install.sh --with-metrics`), always
# stopped and shown.
if [[ -x "$PROMETHEUS_BIN" || -f "$PARLEY_RUN/pids/prometheus.pid" ]]; then
  SERVICES+=(prometheus)
fi
# A second model server for the LLM pool: started on request, always stopped and shown.
if [[ "${PARLEY_LLM_SERVERS:-1}" == 2 || ("${1:-}" != start && -f "$PARLEY_RUN/pids/llm2.pid") ]]; then
  SERVICES+=(llm2)
fi
declare -A STARTUP_SECONDS=([kafka]=120 [kafka1]=120 [kafka2]=120 [kafka3]=120 [registry]=120 [cassandra]=180 [llm]=60
  [milvus]=60 [jaeger]=30 [llm2]=60 [prometheus]=60)
# `start` and `stop` may name some services (e.g. `start kafka`): only those.
if (($# > 1)); then
  for s in "${@:2}"; do [[ " ${SERVICES[*]} " == *" $s "* ]] || die "unknown service $s (one of: ${SERVICES[*]})"; done
  SERVICES=("${@:2}")
fi

# ensure NAME: keeps a running NAME that answers its probe, or one still inside its start-up
# time; restarts one that has been up longer without answering; starts a missing one.
ensure() {
  local name=$1 pidf="$PARLEY_RUN/pids/$1.pid"
  if pid_alive "$pidf"; then
    "${name}_healthy" && return
    local pid; pid=$(pid_of "$pidf")
    (($(ps -o etimes= -p "$pid") < STARTUP_SECONDS[$name])) && return
    log "$name (pid $pid) is running but does not answer; restarting it"
    stop_one "$name"
  fi
  "start_$name"
}

# ensure_master_key: makes the local master key (32 random bytes, base64) if there is none.
ensure_master_key() {
  [[ -s "$PARLEY_MASTER_KEY_FILE" ]] && return
  mkdir -p "$(dirname "$PARLEY_MASTER_KEY_FILE")"
  (umask 077 && head -c 32 /dev/urandom | base64 > "$PARLEY_MASTER_KEY_FILE")
  log "made a master key in $PARLEY_MASTER_KEY_FILE (keep it: what it wraps is unreadable without it)"
}

case "${1:-}" in
  start)
    ensure_master_key
    for s in "${SERVICES[@]}"; do ensure "$s"; done
    for s in "${SERVICES[@]}"; do wait_for "$s" "${STARTUP_SECONDS[$s]}" "${s}_healthy"; done
    traces=$PARLEY_JAEGER_QUERY_URL
    [[ " ${SERVICES[*]} " == *" jaeger "* ]] || traces="not installed yet"
    log "stack up: kafka $PARLEY_KAFKA_BROKERS, registry $PARLEY_SCHEMA_REGISTRY_URL, cql $PARLEY_CQL_NODES, llm $PARLEY_LLM_BASE_URL, milvus $PARLEY_MILVUS_URL, traces $traces"
    ;;
  stop)
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do stop_one "${SERVICES[i]}"; done ;;
  status)
    for s in "${SERVICES[@]}"; do
      if pid_alive "$PARLEY_RUN/pids/$s.pid"; then echo "$s: running (pid $(pid_of "$PARLEY_RUN/pids/$s.pid"))"; else echo "$s: stopped"; fi
    done ;;
  *) echo "usage: $0 start|stop|status [service...]" >&2; exit 2 ;;
esac
