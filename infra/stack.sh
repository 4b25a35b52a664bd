#!/usr/bin/env bash
# Starts, stops or reports the real local stack on 127.0.0.1: Kafka (KRaft), Apicurio
# Registry, Cassandra (the CQL store standing in for ScyllaDB), llama.cpp, Milvus Lite and
# Jaeger. `start` reuses services that are up and answering (and restarts any that are up
# but not answering), so tests can call it freely. Data and logs live under $PARLEY_RUN;
# pids in $PARLEY_RUN/pids.
#   infra/stack.sh start|stop|status
set -euo pipefail
source "$(dirname "$0")/lib.sh"
mkdir -p "$PARLEY_RUN/logs" "$PARLEY_RUN/pids"

# Health probes ask each service a real question, each bounded in time: a process that is
# alive but frozen or wedged (it happened: a stack left stopped by an ended session, reused
# by the next test run) must read as unhealthy, not hang the probe or pass a port check.
kafka_healthy() { timeout 30 java -cp "$PARLEY_CACHE/kafka-$KAFKA_VERSION/libs/*" \
  org.apache.kafka.tools.BrokerApiVersionsCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1; }
registry_healthy() { curl -sf --max-time 5 "http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7/subjects" >/dev/null; }
# A CQL v4 OPTIONS request; a live node answers SUPPORTED (response version 0x84, opcode 0x06).
cassandra_healthy() {
  [ "$(timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"; printf "\x04\x00\x00\x00\x05\x00\x00\x00\x00" >&3; head -c 5 <&3' \
    _ "$CQL_PORT" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 8400000006 ]
}
llm_healthy() { curl -sf --max-time 5 "http://127.0.0.1:$LLM_PORT/health" >/dev/null; }
llm2_healthy() { curl -sf --max-time 5 "http://127.0.0.1:$LLM2_PORT/health" >/dev/null; }
jaeger_healthy() { curl -sf --max-time 5 "http://127.0.0.1:$JAEGER_HEALTH_PORT/status" >/dev/null; }
milvus_healthy() { timeout 20 "$VENV/bin/python" -c 'import sys; from pymilvus import MilvusClient
MilvusClient(sys.argv[1], timeout=10).list_collections()' "http://127.0.0.1:$MILVUS_PORT" >/dev/null 2>&1; }

start_kafka() {
  local pidf="$PARLEY_RUN/pids/kafka.pid" data="$PARLEY_RUN/kafka-data"
  local conf="$PARLEY_RUN/kafka.properties"
  cat >"$conf" <<CONF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$data
num.partitions=6
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=6
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
CONF
  local cp="$PARLEY_CACHE/kafka-$KAFKA_VERSION/libs/*"
  if [ ! -f "$data/meta.properties" ]; then
    java -cp "$cp" kafka.tools.StorageTool format -t "$(java -cp "$cp" kafka.tools.StorageTool random-uuid)" \
      -c "$conf" --standalone >"$PARLEY_RUN/logs/kafka-format.log" 2>&1 \
      || die "formatting Kafka storage failed; see $PARLEY_RUN/logs/kafka-format.log"
  fi
  log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$KAFKA_PORT"
  nohup java -Xms256m -Xmx1g -XX:+UseG1GC -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
    -cp "$cp" kafka.Kafka "$conf" >"$PARLEY_RUN/logs/kafka.log" 2>&1 &
  record_pid $! "$pidf"
}

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

stop_one() {
  local name=$1 pidf="$PARLEY_RUN/pids/$1.pid"
  if pid_alive "$pidf"; then
    local pid; pid=$(pid_of "$pidf")
    log "stopping $name (pid $pid)"
    # CONT first: a stopped process would hold a TERM until it is resumed.
    kill -CONT "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$pidf"
}

SERVICES=(kafka registry cassandra llm milvus jaeger)
# A second model server for the LLM pool: started on request, always stopped and shown.
if [[ "${PARLEY_LLM_SERVERS:-1}" == 2 || ("${1:-}" != start && -f "$PARLEY_RUN/pids/llm2.pid") ]]; then
  SERVICES+=(llm2)
fi
declare -A STARTUP_SECONDS=([kafka]=120 [registry]=120 [cassandra]=180 [llm]=60 [milvus]=60 [jaeger]=30 [llm2]=60)

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

case "${1:-}" in
  start)
    for s in "${SERVICES[@]}"; do ensure "$s"; done
    for s in "${SERVICES[@]}"; do wait_for "$s" "${STARTUP_SECONDS[$s]}" "${s}_healthy"; done
    log "stack up: kafka 127.0.0.1:$KAFKA_PORT, registry $PARLEY_SCHEMA_REGISTRY_URL, cql $PARLEY_CQL_NODES, llm $PARLEY_LLM_BASE_URL, milvus $PARLEY_MILVUS_URL, traces $PARLEY_JAEGER_QUERY_URL"
    ;;
  stop)
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do stop_one "${SERVICES[i]}"; done ;;
  status)
    for s in "${SERVICES[@]}"; do
      if pid_alive "$PARLEY_RUN/pids/$s.pid"; then echo "$s: running (pid $(pid_of "$PARLEY_RUN/pids/$s.pid"))"; else echo "$s: stopped"; fi
    done ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
