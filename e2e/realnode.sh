# shellcheck shell=bash
# The real node of the local cluster, sourced by e2e/cluster.sh:
#   cluster.sh realnode [NAME]   start containerd, the kubelet and kube-proxy (root)
#   cluster.sh realnode-down     stop them and leave no mounts, containers or links
#
# Real parts: the kubelet and kube-proxy of the control plane's release,
# containerd 2 with Debian's runc, the CNI bridge/host-local/loopback/portmap
# plugins. Pods on it run in real containers, get an IP on the bridge
# $REALNODE_BRIDGE ($REALNODE_POD_CIDR), and reach the apiserver through the
# `kubernetes` Service (kube-proxy's iptables rules to the apiserver's
# advertised address, the machine's own IP). The apiserver reaches the
# webhook Service the same way (kube-proxy's OUTPUT rules cover host
# processes), and the kubelet on the node's InternalIP for logs and exec.
#
# What differs from a production node, and why:
# - cgroup v1 machines (this one: a privileged container on cgroup v1) need
#   `failCgroupV1: false`; the driver is cgroupfs (systemd is not PID 1 in a
#   container), and the kubelet makes no QoS cgroups (cgroupsPerQOS: false),
#   as the cgroup tree it is given is the container's.
# - runc cannot write /proc/self/oom_score_adj below the container's own
#   value here: containerd's CRI has restrict_oom_score_adj = true.
# - No registry is reachable: the sandbox image is built here from the
#   kubelet's own pause.c, every image is imported into containerd's k8s.io
#   namespace, and image garbage collection is off (nothing could be pulled
#   back).

REALNODE_STATE="$STATE/realnode"
REALNODE_BRIDGE=rmcni0
REALNODE_POD_CIDR=10.88.0.0/16
CONTAINERD_SOCK="$REALNODE_STATE/containerd/containerd.sock"
KUBELET_PORT=$((PORT_BASE + 50))
KUBELET_HEALTHZ_PORT=$((PORT_BASE + 51))
KUBE_PROXY_METRICS_PORT=$((PORT_BASE + 52))
KUBE_PROXY_HEALTHZ_PORT=$((PORT_BASE + 53))
KUBELET_ROOT=/var/lib/kubelet
SANDBOX_IMAGE="localhost/rm-abstract/pause:$K8S_VERSION"

# The machine's own address (source of its default route): the node's
# InternalIP and the apiserver's advertised address. Loopback when there is
# no route (then a real node cannot run: pods cannot reach 127.0.0.1).
node_ip() {
    local ip
    ip=$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
    echo "${ip:-127.0.0.1}"
}

cgroup_version() {
    if [[ $(stat -fc %T /sys/fs/cgroup 2>/dev/null) == cgroup2fs ]]; then echo 2; else echo 1; fi
}

# Without containerd's cgroup v1 deprecation notice on every call (it is said
# once, in containerd's log).
ctr_() { "$NODE_BIN_DIR/ctr" --address "$CONTAINERD_SOCK" -n k8s.io "$@" 2> >(grep -v 'DEPRECATION: The support for cgroup v1' >&2); }
crictl_() {
    [[ -f "$REALNODE_STATE/crictl.yaml" ]] ||
        printf 'runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 30\n' "$CONTAINERD_SOCK" "$CONTAINERD_SOCK" >"$REALNODE_STATE/crictl.yaml"
    "$NODE_BIN_DIR/crictl" --config "$REALNODE_STATE/crictl.yaml" "$@"
}

realnode_checks() {
    [[ $(id -u) -eq 0 ]] || die "a real node needs root (containers, mounts, network devices)"
    [[ -f "$KUBECONFIG_PATH" ]] && apiserver_ready || die "the cluster is not up; run: e2e/cluster.sh up"
    [[ $(node_ip) != 127.0.0.1 ]] || die "no non-loopback IPv4 address: pods could not reach the apiserver"
    local cmd
    for cmd in runc iptables buildah; do
        command -v "$cmd" >/dev/null || die "$cmd is not installed (e2e/setup.sh installs it)"
    done
    if pgrep -x kubelet >/dev/null && ! pid_alive kubelet; then
        die "another kubelet runs on this machine and owns $KUBELET_ROOT"
    fi
    grep -qw overlay /proc/filesystems || die "overlayfs is not available (containerd's snapshotter)"
}

write_containerd_config() {
    local v1=$(($(cgroup_version) == 1))
    mkdir -p "$REALNODE_STATE/containerd" "$REALNODE_STATE/cni/net.d"
    cat >"$REALNODE_STATE/containerd/config.toml" <<EOF
version = 3
root = "$REALNODE_STATE/containerd/root"
state = "$REALNODE_STATE/containerd/state"

[grpc]
  address = "$CONTAINERD_SOCK"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$SANDBOX_IMAGE"

[plugins."io.containerd.cri.v1.runtime"]
  # A privileged container may not lower its own oom_score_adj (runc fails
  # with "permission denied" otherwise).
  restrict_oom_score_adj = $( ((v1)) && echo true || echo false)
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$CNI_BIN_DIR"]
    conf_dir = "$REALNODE_STATE/cni/net.d"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
      BinaryName = "$(command -v runc)"
      SystemdCgroup = false
      # runc's state under the node's own directory, not /run/containerd:
      # realnode-down finds every container there, even without containerd.
      Root = "$REALNODE_STATE/runc"
EOF
    cat >"$REALNODE_STATE/cni/net.d/10-rm-abstract.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "rm-abstract-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$REALNODE_BRIDGE",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$REALNODE_POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$REALNODE_STATE/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
EOF
}

write_kubelet_config() {
    local name=$1 ip=$2 pki="$STATE/pki"
    local fail_v1=true
    [[ $(cgroup_version) == 1 ]] && fail_v1=false
    cat >"$REALNODE_STATE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 is deprecated: the kubelet refuses it unless told (this machine
# has v1); cgroupfs, as systemd is not the init here.
failCgroupV1: $fail_v1
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
address: $ip
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
failSwapOn: false
# Images cannot be pulled back from a registry: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
maxPods: 110
EOF
}

# An image from one static program: the sandbox ("pause") image.
build_sandbox_image() {
    local archive="$CACHE/images/pause-$K8S_VERSION.tar"
    if [[ ! -f "$archive" ]]; then
        mkdir -p "$CACHE/images"
        # The store e2e/images.sh uses (vfs: no overlay mounts in a container).
        buildah_() { STORAGE_DRIVER=vfs buildah "$@"; }
        local c
        c=$(buildah_ from scratch)
        buildah_ copy --chmod 0755 "$c" "$NODE_BIN_DIR/pause" /pause >/dev/null
        buildah_ config --entrypoint '["/pause"]' --user 65535:65535 "$c"
        buildah_ commit -q --rm "$c" "$SANDBOX_IMAGE" >/dev/null
        buildah_ push -q "$SANDBOX_IMAGE" "docker-archive:$archive.tmp:$SANDBOX_IMAGE"
        mv "$archive.tmp" "$archive"
    fi
    ctr_ images import --no-unpack=false "$archive" >/dev/null
}

node_path() { echo "$NODE_BIN_DIR:$(dirname "$(command -v runc)"):/usr/sbin:/usr/bin:/sbin:/bin"; }

start_kubelet() {
    local name=$1 ip=$2
    mkdir -p "$KUBELET_ROOT"
    PATH=$(node_path) start kubelet --config "$REALNODE_STATE/kubelet.yaml" \
        --kubeconfig "$REALNODE_STATE/kubelet.kubeconfig" --hostname-override "$name" --node-ip "$ip" \
        --root-dir "$KUBELET_ROOT" --node-labels "rm-abstract.io/real-node=true" --v 1
    wait_for kubelet 120 curl -fsS "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz"
}

# The kubelet stopped and started again, as an upgrade or a crash does:
# containers keep running, device plugins must register again.
cmd_restart_kubelet() {
    [[ -f "$REALNODE_STATE/name" ]] || die "the real node is not running; run: e2e/cluster.sh realnode"
    stop_named kubelet
    start_kubelet "$(cat "$REALNODE_STATE/name")" "$(node_ip)"
}

cmd_realnode() {
    local name=${1:-rm-real-node}
    cmd_build_node
    realnode_checks
    local ip pki="$STATE/pki" start_s=$SECONDS
    ip=$(node_ip)
    mkdir -p "$REALNODE_STATE"
    echo "$name" >"$REALNODE_STATE/name"
    # Host directories the node and the chart's hostPath volumes make:
    # removed by realnode-down if they did not exist before.
    local d
    for d in "$KUBELET_ROOT" /var/run/rm-abstract /var/lib/rm-abstract /var/cache/rm-abstract; do
        [[ -e "$d" ]] || echo "$d" >>"$REALNODE_STATE/made-dirs"
    done
    if [[ ! -f "$REALNODE_STATE/kubelet.kubeconfig" ]]; then
        issue_cert kubelet-client "system:node:$name" system:nodes
        issue_cert kubelet-serving "$name" "" "DNS:$name,IP:$ip,IP:127.0.0.1"
        issue_cert kube-proxy system:kube-proxy ""
        write_kubeconfig "$REALNODE_STATE/kubelet.kubeconfig" kubelet-client
        write_kubeconfig "$REALNODE_STATE/kube-proxy.kubeconfig" kube-proxy
    fi
    # Forwarding between the bridge and the machine's interface (masquerade
    # out); pods to the apiserver on this machine need none.
    sysctl -qw net.ipv4.ip_forward=1 || true

    write_containerd_config
    PATH=$(node_path) start containerd --config "$REALNODE_STATE/containerd/config.toml" --log-level warn
    wait_for containerd 60 test -S "$CONTAINERD_SOCK"
    wait_for containerd 60 ctr_ version
    build_sandbox_image

    write_kubelet_config "$name" "$ip"
    start_kubelet "$name" "$ip"
    PATH=$(node_path) start kube-proxy --kubeconfig "$REALNODE_STATE/kube-proxy.kubeconfig" \
        --hostname-override "$name" --proxy-mode iptables --cluster-cidr "$REALNODE_POD_CIDR" \
        --conntrack-max-per-core 0 --metrics-bind-address "127.0.0.1:$KUBE_PROXY_METRICS_PORT" \
        --healthz-bind-address "127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT"
    wait_for kube-proxy 60 curl -fsS "http://127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT/healthz"
    local deadline=$((SECONDS + 120))
    until [[ "$(kubectl_ get node "$name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]; do
        ((SECONDS < deadline)) || die "node $name did not become Ready; log: $STATE/logs/kubelet.log"
        pid_alive kubelet || die "the kubelet exited; log: $STATE/logs/kubelet.log"
        sleep 0.5
    done
    log "real node $name: Ready on $ip in $((SECONDS - start_s))s (containerd $CONTAINERD_VERSION, runc $(runc --version | awk 'NR==1{print $3}'), cgroup v$(cgroup_version))"
}

# fake_devices DIR: the device nodes of a fake tree (DIR/dev, plain files
# written by e2e/devicemanager.sh -layout) made in the real /dev as TEST
# DOUBLES: character devices with /dev/null's numbers, so a container given
# /dev/rbln0 gets a harmless node. Removed by realnode-down.
cmd_fake_devices() {
    local dir=$1 f rel
    [[ -d "$dir/dev" ]] || die "no fake tree at $dir (e2e/devicemanager.sh - -layout $dir ...)"
    [[ -d "$REALNODE_STATE" ]] || die "the real node is not running; run: e2e/cluster.sh realnode"
    while read -r f; do
        rel=${f#"$dir"}
        if [[ ! -e "$rel" ]]; then
            mkdir -p "$(dirname "$rel")"
            mknod -m 0666 "$rel" c 1 3
            echo "$rel" >>"$REALNODE_STATE/fake-device-nodes"
        fi
    done < <(find "$dir/dev" -type f)
    log "fake device nodes (test doubles, /dev/null's numbers): $(wc -l <"$REALNODE_STATE/fake-device-nodes" 2>/dev/null || echo 0)"
    # A live RNGD's firmware advances its heartbeat; the device plugin marks
    # a device whose heartbeat stands still Unhealthy. The TEST DOUBLE of
    # that firmware: a loop that advances every fake heartbeat once a second
    # (written by rename, as sysfs would show a whole value). Stopped by
    # realnode-down.
    local beats=()
    mapfile -t beats < <(find "$dir/sys" -name heartbeat 2>/dev/null)
    if ((${#beats[@]})) && ! { [[ -f "$REALNODE_STATE/fake-heartbeat.pid" ]] &&
        kill -0 "$(cat "$REALNODE_STATE/fake-heartbeat.pid")" 2>/dev/null; }; then
        # shellcheck disable=SC2016 # expanded by the loop's own shell
        # It writes its own pid ($0 is the pid file): setsid may fork.
        setsid bash -c 'echo $$ >"$0"; n=1; while :; do n=$((n + 1)); for f in "$@"; do
            echo "$n" >"$f.next" && mv -f "$f.next" "$f"; done; sleep 1; done' \
            "$REALNODE_STATE/fake-heartbeat.pid" "${beats[@]}" </dev/null >/dev/null 2>&1 9>&- &
        local deadline=$((SECONDS + 5))
        until [[ -s "$REALNODE_STATE/fake-heartbeat.pid" ]] || ((SECONDS > deadline)); do sleep 0.1; done
        log "fake RNGD heartbeats advancing (test double of the firmware): ${#beats[@]}"
    fi
}

# import_image ARCHIVE: a docker-archive or OCI archive into containerd's k8s.io namespace.
cmd_import_image() {
    [[ -S "$CONTAINERD_SOCK" ]] || die "the real node is not running; run: e2e/cluster.sh realnode"
    ctr_ images import "$1" >/dev/null
}

# remove_iptables_chains REGEX: the rules that jump to chains named REGEX,
# then the chains, in the filter, nat and mangle tables.
remove_iptables_chains() {
    local re=$1 table rule chain
    for table in filter nat mangle; do
        { iptables-save -t "$table" 2>/dev/null | grep -E "^-A .*-j ($re)" || true; } | sed 's/^-A /-D /' |
            while read -r rule; do eval "iptables -t $table $rule" 2>/dev/null || true; done
        for chain in $(iptables-save -t "$table" 2>/dev/null | sed -n 's/^:\([^ ]*\) .*/\1/p' | grep -E "^($re)" || true); do
            iptables -t "$table" -F "$chain" 2>/dev/null || true
        done
        for chain in $(iptables-save -t "$table" 2>/dev/null | sed -n 's/^:\([^ ]*\) .*/\1/p' | grep -E "^($re)" || true); do
            iptables -t "$table" -X "$chain" 2>/dev/null || true
        done
    done
}

# Stops the node's processes and removes everything they made: pods
# (through the CRI, so CNI releases their addresses and iptables rules),
# then kubelet and kube-proxy, containerd, leftover shims, mounts under the
# node's directories, the bridge and kube-proxy's rules.
realnode_down() {
    [[ -d "$REALNODE_STATE" ]] || return 0
    local name
    name=$(cat "$REALNODE_STATE/name" 2>/dev/null || echo rm-real-node)
    log "real node $name: stopping"
    stop_named kubelet
    if [[ -S "$CONTAINERD_SOCK" ]] && pid_alive containerd; then
        crictl_ rmp -af >/dev/null 2>&1 || true
    fi
    stop_named kube-proxy
    [[ -x "$NODE_BIN_DIR/kube-proxy" ]] && "$NODE_BIN_DIR/kube-proxy" --cleanup >/dev/null 2>&1 || true
    stop_named containerd
    # Shims that outlived containerd, then containers that outlived their
    # shims (a container whose pod removal failed keeps running without them).
    pkill -KILL -f "containerd-shim-runc-v2 .*-address $CONTAINERD_SOCK" 2>/dev/null || true
    local runc_root id
    for runc_root in "$REALNODE_STATE"/runc/*/; do
        [[ -d "$runc_root" ]] || continue
        for id in $(runc --root "$runc_root" list -q 2>/dev/null); do
            runc --root "$runc_root" kill "$id" KILL 2>/dev/null || true
        done
        for id in $(runc --root "$runc_root" list -q 2>/dev/null); do
            runc --root "$runc_root" delete --force "$id" 2>/dev/null || true
        done
    done
    # containerd's parent cgroup of the containers, once empty.
    rmdir /sys/fs/cgroup/*/k8s.io /sys/fs/cgroup/k8s.io 2>/dev/null || true
    local m root
    for root in "$REALNODE_STATE" "$KUBELET_ROOT" /run/netns/cni-; do
        # Deepest first; the kubelet also bind-mounts its root onto itself.
        { findmnt -rn -o TARGET | grep -E "^$root(/|$)" || true; } | sort -r | while read -r m; do
            umount -l "$m" 2>/dev/null || true
        done
    done
    if [[ -f "$REALNODE_STATE/fake-heartbeat.pid" ]]; then
        kill "$(cat "$REALNODE_STATE/fake-heartbeat.pid")" 2>/dev/null || true
    fi
    if [[ -f "$REALNODE_STATE/fake-device-nodes" ]]; then
        while read -r m; do [[ -c "$m" ]] && rm -f "$m"; done <"$REALNODE_STATE/fake-device-nodes"
        rmdir /dev/rngd 2>/dev/null || true
    fi
    ip link show "$REALNODE_BRIDGE" >/dev/null 2>&1 && ip link delete "$REALNODE_BRIDGE" || true
    # Network namespaces of sandboxes that CNI could not tear down.
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^cni-/ {print $1}'); do ip netns delete "$ns" || true; done
    # The kubelet's own iptables chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY;
    # kube-proxy --cleanup removed its own) and CNI's leftovers.
    remove_iptables_chains 'KUBE-|CNI-'
    if [[ -f "$KUBECONFIG_PATH" ]] && apiserver_ready 2>/dev/null; then
        kubectl_ delete node "$name" --ignore-not-found --wait=false >/dev/null 2>&1 || true
    fi
    rm -rf "$KUBELET_ROOT/pods" "$KUBELET_ROOT/plugins" "$KUBELET_ROOT/pod-resources" \
        "$KUBELET_ROOT/device-plugins"/*.sock "$KUBELET_ROOT/cpu_manager_state" "$KUBELET_ROOT/memory_manager_state"
    if [[ -f "$REALNODE_STATE/made-dirs" ]]; then
        while read -r m; do rm -rf "$m"; done <"$REALNODE_STATE/made-dirs"
    fi
    rm -rf "$REALNODE_STATE"
    log "real node $name: down"
}
