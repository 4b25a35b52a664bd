#!/usr/bin/env bash
# Vendors the operations page's charting library, uPlot (MIT), from the npm registry into
# producers/gateway/static/vendor/, checking the tarball against the integrity pinned here.
# The gateway embeds those files, so building needs no network; run this to move the pin.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
UPLOT_VERSION=1.6.32
UPLOT_INTEGRITY="sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw=="
command -v npm >/dev/null || die "npm is required (apt-get install npm)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "uplot@$UPLOT_VERSION" >/dev/null)
integrity="sha512-$(openssl dgst -sha512 -binary "$work/uplot-$UPLOT_VERSION.tgz" | base64 -w0)"
[ "$integrity" = "$UPLOT_INTEGRITY" ] || die "uplot-$UPLOT_VERSION.tgz: integrity $integrity, expected $UPLOT_INTEGRITY"
tar -xzf "$work/uplot-$UPLOT_VERSION.tgz" -C "$work"
out="$REPO_ROOT/producers/gateway/static/vendor"
mkdir -p "$out"
cp "$work/package/dist/uPlot.iife.min.js" "$out/uPlot.iife.min.js"
cp "$work/package/dist/uPlot.min.css" "$out/uPlot.min.css"
cp "$work/package/LICENSE" "$out/uPlot.LICENSE"
echo "uplot $UPLOT_VERSION $UPLOT_INTEGRITY" >"$out/VERSIONS"
log "vendored uPlot $UPLOT_VERSION into $out"
