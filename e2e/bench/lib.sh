# Shared by the operator benchmarks (contention.sh, growth.sh, operator.sh):
# the cluster, the operator process, its metrics, and workload YAML. Source
# it from a script that has `set -euo pipefail`; it sets ROOT, OPERATOR,
# KUBECONFIG, PATH, work (a temporary folder) and run_id.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
OPERATOR=${OPERATOR:-${1:-target/release/rm-operator}}
[[ -x "$OPERATOR" ]] || { echo "build it first: cargo build --release -p rm-operator" >&2; exit 2; }
KUBECONFIG=$(e2e/cluster.sh up 2>/dev/null | tail -n 1)
export KUBECONFIG
PATH="$(e2e/cluster.sh bin-dir):$PATH"
run_id=$$
work=$(mktemp -d)
op_pid=
metrics_port=

now() { date +%s.%N; }
# elapsed FROM TO: seconds between two `now`s, two decimals.
elapsed() { python3 -c "print(f'{$2 - $1:.2f}')"; }

# start_operator PORT NAMESPACE [ARG...]: runs rm-operator for the
# workloads of NAMESPACE, with its metrics on 127.0.0.1:PORT, and waits
# until it is ready. Its log goes to $work/operator.log.
start_operator() {
    metrics_port=$1
    local ns=$2
    shift 2
    "$OPERATOR" --namespace "$ns" --metrics-addr "127.0.0.1:$metrics_port" "$@" \
        2>"$work/operator.log" &
    op_pid=$!
    until curl -fsS "http://127.0.0.1:$metrics_port/readyz" >/dev/null 2>&1; do
        kill -0 "$op_pid" 2>/dev/null || {
            cat "$work/operator.log" >&2
            echo "rm-operator exited" >&2
            exit 1
        }
        sleep 0.2
    done
}
stop_operator() { [[ -z "$op_pid" ]] || kill "$op_pid" 2>/dev/null || true; }

metrics() { curl -fsS "http://127.0.0.1:$metrics_port/metrics"; }
# counter NAME: the sum of a metric's series (all labels).
counter() { metrics | awk -v m="$1" '$1 ~ "^"m"({|$)" {s+=$2} END {print s+0}'; }
# The operator's API writes, by kind, on one line.
writes_by_kind() {
    metrics | grep '^rm_operator_api_writes_total{' | sed 's/rm_operator_api_writes_total//' | tr '\n' ' '
}
# The operator's CPU time in clock ticks, and its memory.
op_ticks() { awk '{print $14 + $15}' "/proc/$op_pid/stat"; }
ticks_to_s() { python3 -c "print(f'{$1 / $(getconf CLK_TCK):.2f}')"; }
op_memory() { awk '/^(VmRSS|VmHWM)/ {printf "%s %.1f MiB ", $1, $2 / 1024}' "/proc/$op_pid/status"; }

# wait_quiet: returns (prints) the operator's write count once two 5 s
# periods in a row saw no write (rollouts settled, caches caught up).
wait_quiet() {
    local prev=-1 quiet=0 w
    while ((quiet < 2)); do
        w=$(counter rm_operator_api_writes_total)
        if [[ "$w" == "$prev" ]]; then quiet=$((quiet + 1)); else quiet=0; fi
        prev=$w
        sleep 5
    done
    echo "$prev"
}

# gen_workloads FROM TO [PREFIX] [LABELS]: one-replica InferenceWorkloads
# named PREFIX<i> (default w<i>) with the same plain template; LABELS is
# YAML flow, e.g. 'level: "1"'.
gen_workloads() {
    local i prefix=${3:-w} labels=${4:+, labels: {$4\}}
    for ((i = $1; i < $2; i++)); do
        cat <<EOF
---
apiVersion: rm-abstract.io/v1alpha1
kind: InferenceWorkload
metadata: {name: $prefix$i$labels}
spec:
  model: {source: HuggingFaceTB/SmolLM2-135M-Instruct}
  template:
    spec:
      containers:
      - name: app
        image: python:3.12
EOF
    done
}

apply_crd() {
    kubectl apply --server-side --force-conflicts -f crds/inferenceworkload.yaml >/dev/null
    kubectl wait --for=condition=Established crd/inferenceworkloads.rm-abstract.io >/dev/null
}
