#!/usr/bin/env bash
# The operator's cost as the cluster grows (issue 20), on the local control
# plane (prints figures; not a test). The cluster grows to each size in
# LEVELS (default 100 1000 5000 kwok nodes), each node with PODS_PER_NODE
# (default 10) other tenants' pods bound to it, each pod holding one of the
# node's 16 devices (atom, rngd or gpu, by turns). At each size:
#
#  - steady state: the operator's CPU time, API writes (goal 0) and
#    reconciles over WINDOW seconds (default 60) with nothing changing but
#    kwok's node heartbeats, and its memory;
#  - a burst of W (default 100) new one-replica workloads: the time until
#    all are placed, writes per workload, and the mean reconcile;
#  - every workload touched (an annotation): the cost of one reconcile that
#    changes nothing (goal: flat in nodes and pods), and its writes (goal 0).
#
# kwok simulates the nodes and marks the pods Running: no container runs.
# The cluster grows by thousands of objects; if this script brought the
# cluster up, it takes it down at the end (deleting 50,000 pods one by one
# would take longer than the run), else it deletes what it made.
#
# Usage: e2e/bench/growth.sh [OPERATOR_BINARY]   (default target/release/rm-operator)
#        LEVELS="100 1000" W=50 WINDOW=30 e2e/bench/growth.sh
set -euo pipefail
was_up=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && e2e/cluster.sh status | grep -c '^kube-apiserver: running' || true)
# shellcheck source=e2e/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
LEVELS=${LEVELS:-100 1000 5000}
PODS_PER_NODE=${PODS_PER_NODE:-10}
W=${W:-100}
WINDOW=${WINDOW:-60}
DEVICES=16
((PODS_PER_NODE < DEVICES)) || { echo "PODS_PER_NODE must be below $DEVICES (the devices per node)" >&2; exit 2; }
domain="growth-$run_id.e2e.rm-abstract.io"
ns="bgrow-$run_id"
pods_ns="bgrow-pods-$run_id"
cleanup() {
    stop_operator
    if [[ "$was_up" == 0 ]]; then
        e2e/cluster.sh down >/dev/null 2>&1 || true
    else
        echo "deleting the run's pods, workloads and nodes..." >&2
        kubectl delete ns "$ns" "$pods_ns" --ignore-not-found --timeout=900s >/dev/null 2>&1 || true
        kubectl delete nodes -l "bench-growth=$run_id" --timeout=300s >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

apply_crd
kubectl create ns "$ns" >/dev/null
kubectl create ns "$pods_ns" >/dev/null
until kubectl get sa default -n "$pods_ns" >/dev/null 2>&1; do sleep 0.5; done

# grow FROM TO: nodes FROM..TO-1 and their pods, created by 4 kubectl
# processes at a time.
grow() {
    python3 - "$1" "$2" "$run_id" "$domain" "$pods_ns" "$PODS_PER_NODE" "$DEVICES" "$work/grow" <<'PY'
import os, sys
lo, hi, run, domain, ns, per_node, devices, out = sys.argv[1:]
lo, hi, per_node = int(lo), int(hi), int(per_node)
os.makedirs(out, exist_ok=True)
kinds = ["atom", "rngd", "gpu"]
nodes, pods = [], []
for i in range(lo, hi):
    name, res = f"grow-{run}-{i}", f"{domain}/{kinds[i % 3]}"
    nodes.append(f"""---
apiVersion: v1
kind: Node
metadata:
  name: {name}
  annotations: {{kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}}
  labels: {{kubernetes.io/hostname: {name}, kubernetes.io/os: linux, type: kwok, bench-growth: "{run}"}}
status:
  capacity: {{cpu: "32", memory: 256Gi, pods: "110", {res}: "{devices}"}}
  allocatable: {{cpu: "32", memory: 256Gi, pods: "110", {res}: "{devices}"}}
""")
    for j in range(per_node):
        pods.append(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}-{j}, namespace: {ns}, labels: {{app: tenant}}}}
spec:
  nodeName: {name}
  automountServiceAccountToken: false
  containers:
  - name: app
    image: python:3.12
    resources: {{limits: {{{res}: "1"}}}}
""")
def write(kind, docs, parts):
    for p in range(parts):
        with open(f"{out}/{kind}-{p}.yaml", "w") as f:
            f.write("".join(docs[p::parts]))
write("nodes", nodes, 4)
write("pods", pods, 4)
PY
    local kind p pids=()
    for kind in nodes pods; do
        for p in 0 1 2 3; do
            kubectl create -f "$work/grow/$kind-$p.yaml" >/dev/null &
            pids+=($!)
        done
        wait "${pids[@]}"
        pids=()
    done
}
# running_pods: the run's pods that kwok has marked Running.
running_pods() {
    kubectl get pods -n "$pods_ns" --field-selector status.phase=Running --no-headers 2>/dev/null | wc -l
}

# reconcile_stats BEFORE AFTER: count, mean and p50/p99 (bucket upper
# bounds) of the reconciles between two metrics snapshots.
reconcile_stats() {
    python3 - "$1" "$2" <<'PY'
import re, sys
def load(path):
    b, s, c = {}, 0.0, 0
    for line in open(path):
        if line.startswith("rm_operator_reconcile_duration_seconds_bucket"):
            le = re.search(r'le="([^"]+)"', line).group(1)
            b[float("inf") if le == "+Inf" else float(le)] = float(line.split()[-1])
        elif line.startswith("rm_operator_reconcile_duration_seconds_sum"):
            s = float(line.split()[-1])
        elif line.startswith("rm_operator_reconcile_duration_seconds_count"):
            c = int(float(line.split()[-1]))
    return b, s, c
(b0, s0, c0), (b1, s1, c1) = load(sys.argv[1]), load(sys.argv[2])
n = c1 - c0
if n == 0:
    print("no reconcile")
    sys.exit()
def q(f):
    for le in sorted(b1):
        if b1[le] - b0.get(le, 0) >= f * n:
            return "≤ " + ("inf" if le == float("inf") else f"{le * 1000:g} ms")
print(f"{n} reconciles, mean {(s1 - s0) / n * 1000:.2f} ms, p50 {q(0.5)}, p99 {q(0.99)}")
PY
}

start_operator $((18500 + run_id % 300)) "$ns" \
    --resource-name "rbln=$domain/atom" --resource-name "furiosa=$domain/rngd" \
    --resource-name "gpu=$domain/gpu"
summary=()
nodes=0
level=0
for size in $LEVELS; do
    level=$((level + 1))
    ((size > nodes)) || continue
    echo "== $size nodes, $((size * PODS_PER_NODE)) other tenants' pods (kwok)"
    t0=$(now)
    c0=$(op_ticks)
    grow "$nodes" "$size"
    want=$((size * PODS_PER_NODE))
    until (($(running_pods) >= want)); do sleep 5; done
    t1=$(now)
    wait_quiet >/dev/null
    echo "grew from $nodes nodes in $(elapsed "$t0" "$t1") s (all pods Running); operator CPU $(ticks_to_s $(($(op_ticks) - c0))) s meanwhile (to quiet)"
    nodes=$size

    c0=$(op_ticks)
    w0=$(counter rm_operator_api_writes_total)
    r0=$(counter rm_operator_reconciles_total)
    sleep "$WINDOW"
    idle_cpu=$(ticks_to_s $(($(op_ticks) - c0)))
    idle_writes=$(($(counter rm_operator_api_writes_total) - w0))
    idle_reconciles=$(($(counter rm_operator_reconciles_total) - r0))
    memory=$(op_memory)
    rss=$(awk '/^VmRSS/ {printf "%.1f MiB", $2 / 1024}' "/proc/$op_pid/status")
    echo "steady state, $WINDOW s: operator CPU $idle_cpu s, writes $idle_writes (goal 0), reconciles $idle_reconciles; $memory"

    gen_workloads 0 "$W" "l$level-" "level: \"$level\"" >"$work/burst.yaml"
    python3 e2e/bench/count_until.py "$W" True -- kubectl get iw -n "$ns" --watch \
        -o 'jsonpath={.metadata.name} {.status.conditions[?(@.type=="DeviceSelected")].status}{"\n"}' \
        -l "level=$level" >"$work/t_placed" &
    watch=$!
    sleep 1
    metrics >"$work/m0"
    w0=$(counter rm_operator_api_writes_total)
    c0=$(op_ticks)
    t0=$(now)
    kubectl apply --server-side -n "$ns" -f "$work/burst.yaml" >/dev/null
    wait "$watch"
    placed=$(elapsed "$t0" "$(cat "$work/t_placed")")
    w1=$(wait_quiet)
    metrics >"$work/m1"
    burst_cpu=$(ticks_to_s $(($(op_ticks) - c0)))
    burst_writes=$(python3 -c "print(f'{($w1 - $w0) / $W:.1f}')")
    echo "burst of $W workloads: all placed in $placed s; $burst_writes writes per workload; operator CPU $burst_cpu s (to quiet); $(reconcile_stats "$work/m0" "$work/m1")"

    w0=$(counter rm_operator_api_writes_total)
    metrics >"$work/m0"
    kubectl annotate iw --all -n "$ns" bench/touch="$level" --overwrite >/dev/null
    sleep 10
    metrics >"$work/m1"
    touch_writes=$(($(counter rm_operator_api_writes_total) - w0))
    touch=$(reconcile_stats "$work/m0" "$work/m1")
    echo "every workload touched ($((W * level))): $touch; writes $touch_writes (goal 0)"
    summary+=("| $size | $want | $idle_cpu s | $idle_writes | $rss | $placed s | $burst_writes | $touch | $touch_writes |")
done

echo
echo "| nodes | pods | operator CPU in $WINDOW s steady | writes in it | RSS | $W placed in | writes per workload | touch: reconciles | touch: writes |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${summary[@]}"
