#!/usr/bin/env bash
# Placement under contention (issue 20) on the local control plane (prints
# figures; not a test). N workloads (default 500) of one replica applied at
# once on kwok nodes with room for ROOM (default 100) on rbln, ROOM on
# furiosa and ROOM on gpu; the rest go to the cpu fallback. Prints the time
# until every workload is Running, how many landed on each type, the pods
# that were ever Unschedulable (the scheduler's FailedScheduling Events;
# goal 0), reselections (goal 0), API writes per workload, and the
# operator's CPU time and peak memory.
#
# Usage: e2e/bench/contention.sh [OPERATOR_BINARY]   (default target/release/rm-operator)
#        N=500 ROOM=100 NODES_PER_TYPE=10 e2e/bench/contention.sh
set -euo pipefail
# shellcheck source=e2e/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
N=${N:-500}
ROOM=${ROOM:-100}
NODES_PER_TYPE=${NODES_PER_TYPE:-10}
(( ROOM % NODES_PER_TYPE == 0 )) || { echo "ROOM must be a multiple of NODES_PER_TYPE" >&2; exit 2; }
per_node=$((ROOM / NODES_PER_TYPE))

domain="contention-$run_id.e2e.rm-abstract.io"
ns="bcont-$run_id"
nodes=()
cleanup() {
    stop_operator
    rm -rf "$work"
    kubectl delete ns "$ns" --ignore-not-found --timeout=300s >/dev/null 2>&1 || true
    for n in "${nodes[@]}"; do kubectl delete node "$n" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

echo "== nodes: $NODES_PER_TYPE per type with $per_node devices each (room for $ROOM per type), pods=$((N + 50)) per node"
for t in atom rngd gpu; do
    for i in $(seq "$NODES_PER_TYPE"); do
        n="cont-$run_id-$t-$i"
        nodes+=("$n")
        e2e/cluster.sh node "$n" "$domain/$t=$per_node" "pods=$((N + 50))" 2>/dev/null
    done
done
apply_crd
kubectl create ns "$ns" >/dev/null

gen_workloads 0 "$N" >"$work/workloads.yaml"
start_operator $((18900 + run_id % 800)) "$ns" \
    --resource-name "rbln=$domain/atom" --resource-name "furiosa=$domain/rngd" \
    --resource-name "gpu=$domain/gpu"

# A watch tells when the last workload turns Running (polling would take
# CPU from the operator).
python3 e2e/bench/count_until.py "$N" Running -- kubectl get iw -n "$ns" --watch \
    -o 'jsonpath={.metadata.name} {.status.phase}{"\n"}' >"$work/t_running" &
watch_running=$!
sleep 1
c0=$(op_ticks)
t0=$(date +%s.%N)
kubectl apply --server-side -n "$ns" -f "$work/workloads.yaml" >/dev/null
t_apply=$(date +%s.%N)
wait "$watch_running"
c1=$(op_ticks)
t1=$(cat "$work/t_running")
python3 -c "print(f'$N workloads applied in {$t_apply - $t0:.1f} s; all Running {$t1 - $t0:.1f} s after the apply began')"
python3 -c "print(f'operator CPU until then: {($c1 - $c0) / $(getconf CLK_TCK):.2f} s')"

echo "== where they run"
kubectl get iw -n "$ns" -o jsonpath='{range .items[*]}{.status.device.type}{"\n"}{end}' | sort | uniq -c
echo "== goals"
failed=$(kubectl get events -n "$ns" --field-selector reason=FailedScheduling -o name | wc -l)
unschedulable_pods=$(kubectl get events -n "$ns" --field-selector reason=FailedScheduling \
    -o jsonpath='{range .items[*]}{.involvedObject.name}{"\n"}{end}' | sort -u | grep -c . || true)
reselected=$(kubectl get events -n "$ns" --field-selector reason=Reselected -o name | wc -l)
echo "pods ever Unschedulable: $unschedulable_pods ($failed FailedScheduling Events; goal 0)"
echo "reselections: $reselected (goal 0)"
# Writes until the run is quiet.
prev=$(wait_quiet)
r=$(counter rm_operator_reconciles_total)
python3 -c "print(f'API writes: {$prev:.0f} ({$prev / $N:.2f} per workload); reconciles: {$r:.0f} ({$r / $N:.1f} per workload)')"
echo "writes by kind: $(writes_by_kind)"
echo "operator memory: $(op_memory)"
