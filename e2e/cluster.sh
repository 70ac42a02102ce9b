#!/usr/bin/env bash
# A real local Kubernetes cluster for rm-abstract's tests and demo: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler and kwok (simulated
# nodes, for many-node scenarios), and a real node (kubelet, containerd, runc,
# CNI, kube-proxy) that runs real containers; all built from their Go modules
# and cached.
#
#   e2e/cluster.sh up                     build (cached) and start; last line: kubeconfig path
#   e2e/cluster.sh node NAME [RES=N ...]  add a kwok node, e.g. rebellions.ai/ATOM=4 nvidia.com/gpu=8
#   e2e/cluster.sh realnode [NAME]        add a real node: kubelet, containerd, runc, CNI, kube-proxy (root; e2e/realnode.sh)
#   e2e/cluster.sh import-image ARCHIVE   load an image archive into the real node's containerd
#   e2e/cluster.sh realnode-down          stop the real node and remove what it made
#   e2e/cluster.sh down                   stop what `up` and `realnode` started (by pid) and remove its state
#   e2e/cluster.sh build                  only build the binaries
#   e2e/cluster.sh status | env | kubeconfig | bin-dir
#
# Environment: RM_E2E_CACHE (binaries, default ~/.cache/rm-abstract),
# RM_E2E_STATE (certificates, data, logs, pids; default /tmp/rm-abstract-e2e),
# RM_E2E_PORT_BASE (default 16400: etcd +0/+1, apiserver +43, ...).
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOOLS_DIR="$E2E_DIR/tools"

# The version a go.mod requires of a module, in a one-line `require` or in a
# `require ( ... )` block.
required_version() {
    awk -v m="$2" '$1=="require" && $2==m {print $3; exit} $1==m && $2 ~ /^v/ {print $2; exit}' "$1"
}
K8S_VERSION=$(required_version "$TOOLS_DIR/kubernetes/go.mod" k8s.io/kubernetes)
ETCD_VERSION=$(required_version "$TOOLS_DIR/etcd/go.mod" go.etcd.io/etcd/server/v3)
[[ -n "$K8S_VERSION" && -n "$ETCD_VERSION" ]] || {
    echo "[cluster] error: cannot read the Kubernetes and etcd versions from e2e/tools/*/go.mod" >&2
    exit 1
}
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
# The real node (e2e/realnode.sh): containerd 2 (Kubernetes past 1.35 needs
# it), the CNI plugins and crictl of the same minor release as the kubelet.
CONTAINERD_VERSION=v2.4.2
CNI_PLUGINS_VERSION=v1.10.0
CRICTL_VERSION=v1.37.0

CACHE=${RM_E2E_CACHE:-$HOME/.cache/rm-abstract}
BIN_DIR="$CACHE/bin-k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION"
# The real node's binaries: kubelet and kube-proxy beside the control plane's
# (same release), containerd, crictl and the CNI plugins in their own folder.
NODE_BIN_DIR="$CACHE/bin-node-k8s-$K8S_VERSION-containerd-$CONTAINERD_VERSION-cni-$CNI_PLUGINS_VERSION-crictl-$CRICTL_VERSION"
CNI_BIN_DIR="$NODE_BIN_DIR/cni"
STATE=${RM_E2E_STATE:-/tmp/rm-abstract-e2e}
PORT_BASE=${RM_E2E_PORT_BASE:-16400}
ETCD_PORT=$((PORT_BASE + 0))
ETCD_PEER_PORT=$((PORT_BASE + 1))
APISERVER_PORT=$((PORT_BASE + 43))
KCM_PORT=$((PORT_BASE + 57))
SCHEDULER_PORT=$((PORT_BASE + 59))
KWOK_PORT=$((PORT_BASE + 47))
KUBECONFIG_PATH="$STATE/admin.kubeconfig"
SERVICE_CIDR=10.96.0.0/16
# The apiserver listens on every address: pods of the real node reach it
# through the `kubernetes` Service, whose endpoint is the machine's own
# address (node_ip). RM_E2E_APISERVER_BIND=127.0.0.1 keeps it on loopback
# (then no real node).
APISERVER_BIND=${RM_E2E_APISERVER_BIND:-0.0.0.0}

export GOFLAGS=${GOFLAGS:--mod=mod}

log() { printf '[cluster] %s\n' "$*" >&2; }
die() {
    printf '[cluster] error: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- build

# build_one NAME MODULE_DIR PACKAGE: go build PACKAGE inside MODULE_DIR into BIN_DIR/NAME.
# OUT (default BIN_DIR) is the folder it goes to.
build_one() {
    local name=$1 dir=$2 pkg=$3 out=${OUT:-$BIN_DIR}
    if [[ -x "$out/$name" ]]; then
        log "$name: cached ($out/$name)"
        return
    fi
    local blog="$CACHE/build-$name.log" start=$SECONDS
    log "$name: building from $pkg (first time only; log: $blog)"
    mkdir -p "$out"
    if ! (cd "$dir" && go build -trimpath -ldflags='-s -w' -o "$out/$name.tmp" "$pkg") >"$blog" 2>&1; then
        tail -n 20 "$blog" >&2
        die "building $name failed; full log: $blog"
    fi
    mv "$out/$name.tmp" "$out/$name"
    log "$name: built in $((SECONDS - start))s"
}

# install_one NAME PACKAGE@VERSION: go install a module without replace
# directives. OUT (default BIN_DIR) is the folder it goes to.
install_one() {
    local name=$1 pkg=$2 out=${OUT:-$BIN_DIR}
    if [[ -x "$out/$name" ]]; then
        log "$name: cached ($out/$name)"
        return
    fi
    local blog="$CACHE/build-$name.log" start=$SECONDS tmp
    log "$name: building $pkg (first time only; log: $blog)"
    tmp=$(mktemp -d)
    if ! GOBIN="$tmp" GOFLAGS= go install -trimpath -ldflags='-s -w' "$pkg" >"$blog" 2>&1; then
        tail -n 20 "$blog" >&2
        die "building $name failed; full log: $blog"
    fi
    mkdir -p "$out"
    mv "$tmp/$name" "$out/$name"
    rm -rf "$tmp"
    log "$name: built in $((SECONDS - start))s"
}

cmd_build() {
    command -v go >/dev/null || die "go is not on PATH; install Go ${K8S_VERSION#v} or newer toolchain"
    command -v openssl >/dev/null || die "openssl is not on PATH (apt-get install openssl)"
    mkdir -p "$CACHE"
    local k8s="$TOOLS_DIR/kubernetes"
    build_one etcd "$TOOLS_DIR/etcd" .
    build_one kube-apiserver "$k8s" k8s.io/kubernetes/cmd/kube-apiserver
    build_one kube-controller-manager "$k8s" k8s.io/kubernetes/cmd/kube-controller-manager
    build_one kube-scheduler "$k8s" k8s.io/kubernetes/cmd/kube-scheduler
    build_one kubectl "$k8s" k8s.io/kubernetes/cmd/kubectl
    install_one kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
    install_one helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    cmd_build_node
}

# The real node's binaries. containerd is built without cgo (no btrfs or
# devmapper snapshotters: overlayfs is the one used); runc is Debian's
# (e2e/setup.sh), since runc's go.mod has replace directives that `go install`
# refuses.
cmd_build_node() {
    local k8s="$TOOLS_DIR/kubernetes" start=$SECONDS plugin
    OUT=$NODE_BIN_DIR build_one kubelet "$k8s" k8s.io/kubernetes/cmd/kubelet
    OUT=$NODE_BIN_DIR build_one kube-proxy "$k8s" k8s.io/kubernetes/cmd/kube-proxy
    local ctrd=github.com/containerd/containerd/v2/cmd
    CGO_ENABLED=0 OUT=$NODE_BIN_DIR install_one containerd "$ctrd/containerd@$CONTAINERD_VERSION"
    CGO_ENABLED=0 OUT=$NODE_BIN_DIR install_one containerd-shim-runc-v2 "$ctrd/containerd-shim-runc-v2@$CONTAINERD_VERSION"
    CGO_ENABLED=0 OUT=$NODE_BIN_DIR install_one ctr "$ctrd/ctr@$CONTAINERD_VERSION"
    OUT=$NODE_BIN_DIR install_one crictl "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
    for plugin in main/bridge main/loopback ipam/host-local meta/portmap; do
        CGO_ENABLED=0 OUT=$CNI_BIN_DIR install_one "${plugin#*/}" \
            "github.com/containernetworking/plugins/plugins/$plugin@$CNI_PLUGINS_VERSION"
    done
    # The sandbox ("pause") image's program, from the kubelet's own source:
    # no registry is reachable to pull registry.k8s.io/pause.
    if [[ ! -x "$NODE_BIN_DIR/pause" ]]; then
        local src
        src=$(cd "$k8s" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
        [[ -f "$src" ]] || die "pause.c not found in the k8s.io/kubernetes module ($src)"
        gcc -Os -static -Wall -Werror -DVERSION="$K8S_VERSION" -o "$NODE_BIN_DIR/pause.tmp" "$src" ||
            die "compiling pause.c failed (needs gcc and libc6-dev)"
        strip "$NODE_BIN_DIR/pause.tmp"
        mv "$NODE_BIN_DIR/pause.tmp" "$NODE_BIN_DIR/pause"
    fi
    log "real-node binaries ready in $((SECONDS - start))s ($NODE_BIN_DIR)"
}

# ---------------------------------------------------------------- certificates

# issue_cert NAME CN ORG [SAN]: a key and certificate signed by the cluster CA.
issue_cert() {
    local name=$1 cn=$2 org=$3 san=${4:-} pki="$STATE/pki"
    local subj="/CN=$cn"
    [[ -n "$org" ]] && subj="/O=$org/CN=$cn"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$pki/$name.key" -out "$pki/$name.csr" -subj "$subj" 2>/dev/null
    local ext="$pki/$name.ext"
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        if [[ -n "$san" ]]; then
            echo "extendedKeyUsage=serverAuth,clientAuth"
            echo "subjectAltName=$san"
        else
            echo "extendedKeyUsage=clientAuth"
        fi
    } >"$ext"
    openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
        -CAcreateserial -days 3650 -sha256 -extfile "$ext" -out "$pki/$name.crt" 2>/dev/null
    rm -f "$pki/$name.csr" "$ext"
}

# write_kubeconfig FILE CERT_NAME: a kubeconfig for the cluster with a client certificate.
write_kubeconfig() {
    local file=$1 name=$2 pki="$STATE/pki"
    cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: rm-abstract-e2e
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 "$pki/$name.crt")
    client-key-data: $(base64 -w0 "$pki/$name.key")
contexts:
- name: rm-abstract-e2e
  context:
    cluster: rm-abstract-e2e
    user: $name
    namespace: default
current-context: rm-abstract-e2e
EOF
}

make_pki() {
    local pki="$STATE/pki"
    [[ -f "$pki/done" ]] && return
    log "generating certificates in $pki"
    mkdir -p "$pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -keyout "$pki/ca.key" -out "$pki/ca.crt" -subj "/CN=rm-abstract-e2e-ca" 2>/dev/null
    issue_cert apiserver kube-apiserver "" \
        "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1,IP:$(node_ip)"
    issue_cert admin admin system:masters
    issue_cert controller-manager system:kube-controller-manager ""
    issue_cert scheduler system:kube-scheduler ""
    issue_cert kwok kwok-controller system:masters
    # Service-account tokens: signing key of the apiserver, verified with its public half.
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    write_kubeconfig "$KUBECONFIG_PATH" admin
    write_kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager
    write_kubeconfig "$STATE/scheduler.kubeconfig" scheduler
    write_kubeconfig "$STATE/kwok.kubeconfig" kwok
    touch "$pki/done"
}

# ---------------------------------------------------------------- processes

pid_alive() { [[ -f "$STATE/pids/$1.pid" ]] && kill -0 "$(cat "$STATE/pids/$1.pid")" 2>/dev/null; }

# start NAME ARGS...: start BIN_DIR/NAME in the background, logging to STATE/logs.
start() {
    local name=$1
    shift
    if pid_alive "$name"; then
        log "$name: already running (pid $(cat "$STATE/pids/$name.pid"))"
        return
    fi
    mkdir -p "$STATE/pids" "$STATE/logs"
    log "$name: starting (log: $STATE/logs/$name.log)"
    # setsid: its own process group, so a test runner's signals do not reach it.
    # 9>&-: the daemon must not inherit (and so hold) the lock of `up`.
    local bin="$BIN_DIR/$name"
    [[ -x "$bin" ]] || bin="$NODE_BIN_DIR/$name"
    setsid "$bin" "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null 9>&- &
    echo $! >"$STATE/pids/$name.pid"
}

# wait_for NAME SECONDS COMMAND...: poll COMMAND until it succeeds.
wait_for() {
    local name=$1 timeout=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ! pid_alive "$name"; then
            tail -n 20 "$STATE/logs/$name.log" >&2 || true
            die "$name exited during start-up; log: $STATE/logs/$name.log"
        fi
        if ((SECONDS > deadline)); then
            tail -n 20 "$STATE/logs/$name.log" >&2 || true
            die "$name not ready after ${timeout}s; log: $STATE/logs/$name.log"
        fi
        sleep 0.3
    done
    log "$name: ready"
}

apiserver_ready() {
    curl -fsS --cacert "$STATE/pki/ca.crt" --cert "$STATE/pki/admin.crt" --key "$STATE/pki/admin.key" \
        "https://127.0.0.1:$APISERVER_PORT/readyz" >/dev/null
}

kubectl_() { "$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

write_kwok_config() {
    local kwok_dir
    kwok_dir=$(GOFLAGS= go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [[ -d "$kwok_dir/kustomize/stage" ]] || die "kwok $KWOK_VERSION module source not found (go mod download failed?)"
    {
        cat <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  manageAllNodes: false
  manageNodesWithAnnotationSelector: kwok.x-k8s.io/node=fake
  cidr: 10.244.0.0/16
  nodeIP: 10.0.0.1
  nodeLeaseDurationSeconds: 40
  nodeLeaseParallelism: 4
  nodePlayStageParallelism: 4
  podPlayStageParallelism: 8
  podsOnNodeSyncParallelism: 2
EOF
        # The stages kwok's own "fast" profile uses: nodes become Ready and keep
        # their leases; pods are Running at once, complete and delete normally.
        for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
            pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
            echo "---"
            cat "$kwok_dir/kustomize/stage/$f"
        done
    } >"$STATE/kwok.yaml"
}

cmd_up() {
    cmd_build
    mkdir -p "$STATE"
    exec 9>"$STATE.lock"
    flock 9
    if pid_alive kube-apiserver && apiserver_ready; then
        log "already up; reusing it"
    else
        # Nothing usable is running: start from a clean state, so that a
        # control plane left by an earlier session brings none of its objects.
        stop_processes
        rm -rf "$STATE"
        mkdir -p "$STATE"
        make_pki
        local pki="$STATE/pki"
        start etcd --name rm-e2e --data-dir "$STATE/etcd" \
            --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
            --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
            --initial-cluster "rm-e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
            --unsafe-no-fsync --quota-backend-bytes 2147483648 --log-level warn
        wait_for etcd 60 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

        start kube-apiserver --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
            --bind-address "$APISERVER_BIND" --advertise-address "$(node_ip)" --secure-port "$APISERVER_PORT" \
            --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
            --client-ca-file "$pki/ca.crt" \
            --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
            --service-account-issuer https://kubernetes.default.svc.cluster.local \
            --api-audiences https://kubernetes.default.svc.cluster.local \
            --service-cluster-ip-range "$SERVICE_CIDR" \
            --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
            --allow-privileged=true --profiling=false --endpoint-reconciler-type lease \
            --kubelet-preferred-address-types InternalIP \
            --kubelet-client-certificate "$pki/admin.crt" --kubelet-client-key "$pki/admin.key"
        wait_for kube-apiserver 120 apiserver_ready

        start kube-controller-manager --kubeconfig "$STATE/controller-manager.kubeconfig" \
            --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
            --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
            --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --leader-elect=false \
            --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
            --use-service-account-credentials=true \
            --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
            --service-cluster-ip-range "$SERVICE_CIDR" --profiling=false
        start kube-scheduler --kubeconfig "$STATE/scheduler.kubeconfig" \
            --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
            --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
            --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" --leader-elect=false --profiling=false
        write_kwok_config
        start kwok --kubeconfig "$STATE/kwok.kubeconfig" --config "$STATE/kwok.yaml" \
            --server-address "127.0.0.1:$KWOK_PORT"

        # Ready for workloads once the controllers have made the default
        # service account (token controller and root CA publisher work too).
        wait_for kube-controller-manager 90 kubectl_ get serviceaccount default -n default
        wait_for kube-controller-manager 60 kubectl_ get configmap kube-root-ca.crt -n default
        wait_for kube-scheduler 60 curl -fsSk "https://127.0.0.1:$SCHEDULER_PORT/healthz"
        wait_for kwok 60 curl -fsS "http://127.0.0.1:$KWOK_PORT/healthz"
    fi
    flock -u 9
    log "up: kubectl --kubeconfig $KUBECONFIG_PATH get nodes   (binaries: $BIN_DIR)"
    echo "$KUBECONFIG_PATH"
}

# stop_named NAME: SIGTERM the process `start` started, SIGKILL after 10 s.
stop_named() {
    local name=$1 pid
    [[ -f "$STATE/pids/$name.pid" ]] || return 0
    pid=$(cat "$STATE/pids/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
        log "$name: stopping (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/pids/$name.pid"
}

stop_processes() {
    local name
    for name in kubelet kube-proxy containerd kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
        stop_named "$name"
    done
}

cmd_down() {
    realnode_down
    stop_processes
    rm -rf "$STATE" "$STATE.lock"
    log "down"
}

# node NAME [RESOURCE=COUNT ...]: a kwok node with those extended resources.
# cpu, memory and pods default to 32, 256Gi and 110 (the kubelet's pod
# limit); RESOURCE=COUNT overrides them too, e.g. pods=3000.
cmd_node() {
    local name=${1:?usage: cluster.sh node NAME [RESOURCE=COUNT ...]}
    shift
    [[ -f "$KUBECONFIG_PATH" ]] || die "the cluster is not up; run: e2e/cluster.sh up"
    local kv key value
    local -a keys=(cpu memory pods)
    local -A counts=([cpu]=32 [memory]=256Gi [pods]=110)
    for kv in "$@"; do
        [[ "$kv" == *=* ]] || die "resource '$kv' is not RESOURCE=COUNT (e.g. rebellions.ai/ATOM=4)"
        key=${kv%%=*}
        value=${kv#*=}
        [[ "$value" =~ ^[0-9]+$ ]] || die "count of $key must be a whole number, got '$value'"
        [[ -v "counts[$key]" ]] || keys+=("$key")
        counts[$key]=$value
    done
    local resources="" items=""
    for key in "${keys[@]}"; do
        resources+="
    $key: \"${counts[$key]}\""
        items+="${items:+,}\"$key\":\"${counts[$key]}\""
    done
    kubectl_ apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: $name
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
spec: {}
status:
  capacity:$resources
  allocatable:$resources
EOF
    # Apply ignores status on update: make sure it holds the resources asked for.
    kubectl_ patch node "$name" --subresource status --type merge \
        -p "{\"status\":{\"capacity\":{$items},\"allocatable\":{$items}}}" >/dev/null
    local deadline=$((SECONDS + 30))
    until [[ "$(kubectl_ get node "$name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]; do
        ((SECONDS < deadline)) || die "node $name did not become Ready (is kwok running? log: $STATE/logs/kwok.log)"
        sleep 0.3
    done
    log "node $name: Ready ${*:-(no extended resources)}"
}

cmd_status() {
    local name
    for name in etcd kube-apiserver kube-controller-manager kube-scheduler kwok containerd kubelet kube-proxy; do
        if pid_alive "$name"; then echo "$name: running (pid $(cat "$STATE/pids/$name.pid"))"; else echo "$name: stopped"; fi
    done
}

# shellcheck source=e2e/realnode.sh
source "$E2E_DIR/realnode.sh"

case "${1:-}" in
    up) cmd_up ;;
    realnode) shift; cmd_realnode "$@" ;;
    realnode-down) realnode_down ;;
    import-image) shift; cmd_import_image "$@" ;;
    realnode-fake-devices) shift; cmd_fake_devices "$@" ;;
    realnode-dir) echo "$REALNODE_STATE" ;;
    realnode-restart-kubelet) cmd_restart_kubelet ;;
    realnode-crictl) shift; crictl_ "$@" ;;
    down) cmd_down ;;
    build) cmd_build ;;
    node) shift; cmd_node "$@" ;;
    status) cmd_status ;;
    kubeconfig) echo "$KUBECONFIG_PATH" ;;
    bin-dir) echo "$BIN_DIR" ;;
    env) echo "export PATH=\"$BIN_DIR:\$PATH\" KUBECONFIG=\"$KUBECONFIG_PATH\"" ;;
    *)
        sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
