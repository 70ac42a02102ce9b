#!/usr/bin/env bash
# Operator benchmark on the local control plane (prints figures; not a test).
#
#  1. 200 Deployments applied with kubectl, time until all exist (baseline);
#     200 InferenceWorkloads applied at once with rm-operator running, time
#     until every one has its Deployment and DeviceSelected=True. Same run.
#     With the CPU seconds each control-plane process and the operator used.
#  2. Resident memory of rm-operator with 1000 workloads.
#  3. API writes per reconcile at steady state (every workload touched).
#  4. The apiserver's and etcd's CPU per request kind.
#
# Usage: e2e/bench/operator.sh [OPERATOR_BINARY]   (default: target/release/rm-operator)
set -euo pipefail
# shellcheck source=e2e/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
res="bench-$run_id.e2e.rm-abstract.io/gpu"
# Room for every pod of the run: a kubelet takes 110 by default.
e2e/cluster.sh node "bench-$run_id" "$res=5000" pods=3000 2>/dev/null
apply_crd
# The node goes last: pods bound to a node that is gone wait minutes for the
# pod garbage collector, and a run that overlaps that deletion measures it.
trap 'stop_operator; rm -rf "$work"; kubectl delete ns "bd-$run_id" "bw-$run_id" "bc-$run_id" "bx-$run_id" --ignore-not-found --timeout=300s >/dev/null 2>&1 || true; kubectl delete node "bench-$run_id" >/dev/null 2>&1 || true' EXIT
leftovers() { kubectl get ns --no-headers 2>/dev/null | grep -cE '^b[dwcx]-[0-9]+ ' || true; }
if [[ $(leftovers) -gt 0 ]]; then
    echo "waiting for an earlier run's namespaces to be deleted..."
    for _ in $(seq 60); do [[ $(leftovers) -eq 0 ]] && break; sleep 5; done
fi
kubectl create ns "bd-$run_id" >/dev/null
kubectl create ns "bw-$run_id" >/dev/null
kubectl create ns "bc-$run_id" >/dev/null

# CPU time (clock ticks) of the control plane's processes and the operator.
cpu_ticks() {
    local f
    for f in "${RM_E2E_STATE:-/tmp/rm-abstract-e2e}"/pids/*.pid; do
        echo "$(basename "$f" .pid) $(awk '{print $14 + $15}' "/proc/$(cat "$f")/stat")"
    done
    [[ -z "$op_pid" ]] || echo "rm-operator $(awk '{print $14 + $15}' "/proc/$op_pid/stat")"
}
# cpu_report BEFORE AFTER SECONDS: CPU seconds each used in the window.
cpu_report() {
    python3 - "$1" "$2" "$3" "$(getconf CLK_TCK)" "$(nproc)" <<'PYEOF2'
import sys
def load(text): return {l.split()[0]: int(l.split()[1]) for l in text.splitlines() if l.strip()}
a, b, secs, hz, cpus = load(sys.argv[1]), load(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
used = {k: (b[k] - a.get(k, 0)) / hz for k in b}
total = sum(used.values())
parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))
print(f"  CPU seconds in those {secs:.2f} s: {parts}; total {total:.2f} of {cpus * secs:.2f} ({cpus} CPUs)")
PYEOF2
}

# The same pod template as gen_workloads renders: one container asking for
# one device.
gen_deployments() { # gen_deployments FROM TO
    local i
    for ((i = $1; i < $2; i++)); do
        cat <<EOF
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d$i, labels: {app: d$i}}
spec:
  replicas: 1
  selector: {matchLabels: {app: d$i}}
  template:
    metadata: {labels: {app: d$i}}
    spec:
      containers:
      - name: app
        image: python:3.12
        resources: {limits: {"$res": "1"}}
EOF
    done
}
gen_deployments 0 200 >"$work/deployments.yaml"
gen_workloads 0 200 >"$work/workloads.yaml"
gen_workloads 200 1000 >"$work/more.yaml"

echo "== 1. 200 at once"
c0=$(cpu_ticks)
t0=$(now)
kubectl apply --server-side -n "bd-$run_id" -f "$work/deployments.yaml" >/dev/null
t1=$(now)
baseline=$(elapsed "$t0" "$t1")
echo "kubectl apply --server-side of 200 Deployments: ${baseline}s"
cpu_report "$c0" "$(cpu_ticks)" "$baseline"
# Their rollouts settle before the next step, so that it is measured alone.
kubectl wait --for=condition=Available deploy --all -n "bd-$run_id" --timeout=300s >/dev/null

# The custom resources alone, before any operator runs: what the apiserver
# takes to store them, the floor under the operator's figure.
c0=$(cpu_ticks)
t0=$(now)
kubectl apply --server-side -n "bc-$run_id" -f "$work/workloads.yaml" >/dev/null
t1=$(now)
crs_only=$(elapsed "$t0" "$t1")
echo "kubectl apply --server-side of 200 InferenceWorkloads, no operator running: ${crs_only}s"
cpu_report "$c0" "$(cpu_ticks)" "$crs_only"

start_operator $((18100 + run_id % 800)) "bw-$run_id" \
    --resource-name "gpu=$res" --resource-name "rbln=none-$run_id.e2e.rm-abstract.io/atom" \
    --resource-name "furiosa=none-$run_id.e2e.rm-abstract.io/rngd"

selected() {
    kubectl get iw -n "bw-$run_id" -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="DeviceSelected")].status}{"\n"}{end}' | grep -c True || true
}
# Two watches tell when the last Deployment and the last DeviceSelected=True
# appear (polling would cost the machine CPU the operator competes for).
python3 e2e/bench/count_until.py 200 True -- kubectl get iw -n "bw-$run_id" --watch \
    -o 'jsonpath={.metadata.name} {.status.conditions[?(@.type=="DeviceSelected")].status}{"\n"}' >"$work/t_selected" &
watch_selected=$!
python3 e2e/bench/count_until.py 200 "" -- kubectl get deploy -n "bw-$run_id" --watch \
    -o 'jsonpath={.metadata.name}{"\n"}' >"$work/t_deployed" &
watch_deployed=$!
sleep 1 # both watches listed and watching
c0=$(cpu_ticks)
t0=$(now)
kubectl apply --server-side -n "bw-$run_id" -f "$work/workloads.yaml" >/dev/null
t_apply=$(now)
wait "$watch_selected" "$watch_deployed"
c1=$(cpu_ticks)
t1=$(python3 -c "print(max(float(open('$work/t_selected').read()), float(open('$work/t_deployed').read())))")
with_operator=$(elapsed "$t0" "$t1")
apply_only=$(elapsed "$t0" "$t_apply")
echo "kubectl apply --server-side of 200 InferenceWorkloads: ${apply_only}s; until all have Deployment + DeviceSelected: ${with_operator}s"
cpu_report "$c0" "$c1" "$with_operator"
python3 -c "b=$baseline; w=$with_operator; a=$apply_only; print(f'operator adds {100*(w-b)/b:.0f}% to the Deployments-only time (goal: at most 25%); of that, applying the 200 custom resources (beside the writes of the operator, on the same CPUs) is {100*(a-b)/b:.0f}% and the operator after the last one was stored {100*(w-a)/b:.0f}%')"

echo "== 2. memory with 1000 workloads"
kubectl apply --server-side -n "bw-$run_id" -f "$work/more.yaml" >/dev/null
until [[ $(selected) -ge 1000 ]]; do sleep 1; done
sleep 5
echo "operator memory: $(op_memory)"

echo "== 3. API writes per reconcile at steady state (1000 workloads)"
# Let the rollouts settle (pods Running, Deployments ready).
wait_quiet >/dev/null
k0=$(writes_by_kind)
w0=$(counter rm_operator_api_writes_total)
r0=$(counter rm_operator_reconciles_total)
kubectl annotate iw --all -n "bw-$run_id" bench/touch="$(date +%s)" --overwrite >/dev/null
sleep 10
w1=$(counter rm_operator_api_writes_total)
r1=$(counter rm_operator_reconciles_total)
k1=$(writes_by_kind)
python3 -c "r=$r1-$r0; w=$w1-$w0; print(f'reconciles: {r:.0f}, writes: {w:.0f}, writes per reconcile: {w/max(r,1):.3f} (goal: 0)')"
if [[ "$k0" == "$k1" ]]; then
    echo "writes by kind since start (1000 workloads): $k1"
else
    printf 'writes by kind, before: %s\n                after:  %s\n' "$k0" "$k1"
fi

echo "== 4. apiserver and etcd CPU per request, by kind (200 each, one at a time)"
python3 e2e/bench/request_cost.py "$KUBECONFIG" "${RM_E2E_STATE:-/tmp/rm-abstract-e2e}" "bx-$run_id" 200
