#!/usr/bin/env bash
# Runs rm-device-plugin against the kubelet's own device manager
# (e2e/tools/kubernetes/devicemanager-harness, built from k8s.io/kubernetes
# v1.37.2 and cached under ~/.cache/rm-abstract). The device manager serves the
# kubelet's fixed socket /var/lib/kubelet/device-plugins/kubelet.sock, so this
# needs root and no kubelet running on the machine; otherwise it says why and
# skips.
#   e2e/devicemanager.sh [path/to/rm-device-plugin [harness flags, e.g. -report -gpus 8]]
#   e2e/devicemanager.sh - -layout DIR -atoms 4 ...   only write the fake tree (no device manager)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PLUGIN=${1:-"$ROOT/target/debug/rm-device-plugin"}
shift || true
log() { printf '[devicemanager] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "SKIPPED: the kubelet's device manager needs root (it serves /var/lib/kubelet/device-plugins/kubelet.sock)"
    exit 0
fi
layout_only=false
[[ " $* " == *" -layout "* ]] && layout_only=true
if ! $layout_only && pgrep -x kubelet >/dev/null; then
    log "SKIPPED: a kubelet runs on this machine and owns /var/lib/kubelet/device-plugins"
    exit 0
fi
$layout_only || [[ -x "$PLUGIN" ]] || cargo build -q --locked -p rm-device-plugin --bin rm-device-plugin

mod="$ROOT/e2e/tools/kubernetes"
stamp=$(cat "$mod/go.mod" "$mod/go.sum" "$mod/devicemanager-harness/main.go" | sha256sum | cut -c1-16)
bin="${RM_CACHE:-$HOME/.cache/rm-abstract}/devicemanager-harness-$stamp"
if [[ ! -x "$bin" ]]; then
    log "building the harness with the kubelet's device manager (k8s.io/kubernetes v1.37.2; minutes, once)"
    mkdir -p "$(dirname "$bin")"
    (cd "$mod" && go build -o "$bin.tmp" ./devicemanager-harness)
    mv "$bin.tmp" "$bin"
fi
# The kubelet's directory, made for the device manager and removed after
# when it did not exist before (the real node's kubelet starts clean).
made_kubelet_dir=false
[[ -e /var/lib/kubelet ]] || made_kubelet_dir=true
mkdir -p /var/lib/kubelet/device-plugins
status=0
"$bin" -plugin "$PLUGIN" "$@" 2> >(grep -v '^[IE][0-9]\{4\} ' >&2) || status=$?
if $made_kubelet_dir && ! pgrep -x kubelet >/dev/null; then rm -rf /var/lib/kubelet; fi
exit "$status"
