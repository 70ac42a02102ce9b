#!/usr/bin/env bash
# The main job: brings up the local control plane, registers rm-device-plugin
# on fake device trees with the kubelet's device manager and gives kwok nodes
# the GPU, ATOM and RNGD capacity it advertised, installs the Helm chart, runs
# the operator as the chart's ServiceAccount, applies the examples and shows
# where each runs and why (kubectl inference), then runs an unchanged user
# script with the env the webhook injected, generating text with SmolLM2
# through the node agent. Exits non-zero when any step fails.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
steps_done=()

step "set-up (Debian packages, control-plane binaries; cached after the first run)"
e2e/setup.sh
steps_done+=("set-up")

step "building rm-operator, rm-agent and kubectl-inference"
# The same build as `cargo test --workspace` (features unify the same way), so
# after e2e/test.sh's tests nothing is rebuilt: a narrower build would resolve
# build-dependency features differently and compile llama.cpp a second time.
cargo test -q --locked --workspace --no-run 2>/dev/null ||
    cargo test --locked --workspace --no-run
PATH="${CARGO_TARGET_DIR:-$ROOT/target}/debug:$PATH"
steps_done+=("binaries built")

step "local control plane"
kubeconfig=$(e2e/cluster.sh up | tail -n 1)
export KUBECONFIG=$kubeconfig
PATH="$(e2e/cluster.sh bin-dir):$PATH"
steps_done+=("control plane up")

step "rm-device-plugin on fake device trees, registered with the kubelet's device manager"
# What a kubelet would report for each node: rm-device-plugin discovers the
# TEST DOUBLE sysfs/dev trees (no accelerator here) and registers with the
# kubelet's own device manager (k8s.io/kubernetes, e2e/devicemanager.sh),
# whose allocatable resources become the kwok nodes' status below. Beside
# the accelerators, rm-abstract.io/agent: the node agent's socket, which CPU
# pods request instead of mounting a hostPath.
declare -A node_resources=(
    [demo-npu]="-atoms 4 -rngds 2"
    [demo-gpu]="-gpus 8"
    [demo-cpu]=""
)
declare -A reported=()
for node in demo-npu demo-gpu demo-cpu; do
    # shellcheck disable=SC2086 # the flags are words
    reported[$node]=$(e2e/devicemanager.sh "$(command -v rm-device-plugin)" -report ${node_resources[$node]} | tr '\n' ' ')
done
if [[ -z "${reported[demo-gpu]// /}" ]]; then
    # Not root, or a kubelet owns the device-plugin directory: the numbers
    # the fake trees would have given.
    echo "(the kubelet's device manager cannot run here; using the fake trees' counts)"
    reported=([demo-npu]="rebellions.ai/ATOM=4 furiosa.ai/rngd=2 rm-abstract.io/agent=100"
        [demo-gpu]="nvidia.com/gpu=8 rm-abstract.io/agent=100" [demo-cpu]="rm-abstract.io/agent=100")
    steps_done+=("device counts from the fake trees (no device manager here)")
else
    for node in demo-npu demo-gpu demo-cpu; do echo "$node: ${reported[$node]}"; done
    steps_done+=("device plugin registered with the kubelet's device manager")
fi

step "kwok nodes with what the device plugin advertised"
for node in demo-npu demo-gpu demo-cpu; do
    # shellcheck disable=SC2086
    e2e/cluster.sh node "$node" ${reported[$node]}
done
kubectl get nodes -o custom-columns='NODE:.metadata.name,ATOM:.status.allocatable.rebellions\.ai/ATOM,RNGD:.status.allocatable.furiosa\.ai/rngd,GPU:.status.allocatable.nvidia\.com/gpu,READY:.status.conditions[?(@.type=="Ready")].status'
steps_done+=("3 nodes")

state=$(dirname "$kubeconfig")/demo
mkdir -p "$state"
step "helm install charts/rm-abstract: CRD, RBAC, webhook configuration (its pods pinned to no node: kwok runs no containers)"
chart_ns=rm-system
# Release "rm-abstract": the chart's objects are rm-abstract-operator, ...
cat >"$state/values.yaml" <<EOF
operator:
  watchNamespace: rm-demo
  nodeSelector: {rm-abstract.io/demo-no-node: "true"}
devicePlugin:
  nodeSelector: {rm-abstract.io/demo-no-node: "true"}
agent:
  nodeSelector: {rm-abstract.io/demo-no-node: "true"}
webhook:
  url: https://127.0.0.1:18443
  extraDnsNames: [127.0.0.1, localhost]
  namespaceSelector: {rm-abstract.io/demo: "true"}
EOF
helm upgrade --install rm-abstract charts/rm-abstract -n "$chart_ns" --create-namespace \
    -f "$state/values.yaml" >"$state/helm.log"
tail -n 3 "$state/helm.log"
kubectl wait --for=condition=Established crd/inferenceworkloads.rm-abstract.io --timeout=60s
steps_done+=("chart installed")

step "rm-operator as the chart's ServiceAccount, with the installed Deployment's flags: controller and webhook on https://127.0.0.1:18443"
for p in operator agent; do
    [[ -f "$state/$p.pid" ]] && kill "$(cat "$state/$p.pid")" 2>/dev/null || true
done
trap 'for p in operator agent; do [[ -f "$state/$p.pid" ]] && kill "$(cat "$state/$p.pid")" 2>/dev/null || true; done' EXIT
# A fresh namespace each run, so that every pod shown went through the webhook.
kubectl delete namespace rm-demo --ignore-not-found --timeout=120s >/dev/null
kubectl create namespace rm-demo >/dev/null
kubectl label namespace rm-demo rm-abstract.io/demo=true --overwrite >/dev/null
e2e/chart-operator.sh kubeconfig "$chart_ns" rm-abstract-operator "$state/operator-sa.kubeconfig"
echo "as $(KUBECONFIG=$state/operator-sa.kubeconfig kubectl auth whoami -o jsonpath='{.status.userInfo.username}')"
INSTALLER_KUBECONFIG=$KUBECONFIG KUBECONFIG=$state/operator-sa.kubeconfig POD_NAME=rm-abstract-demo \
    POD_NAMESPACE=$chart_ns e2e/chart-operator.sh run "$chart_ns" rm-abstract "$state" \
    127.0.0.1:18080 127.0.0.1:18443 >"$state/operator.log" 2>&1 &
echo $! >"$state/operator.pid"
deadline=$((SECONDS + 120))
until curl -fsS http://127.0.0.1:18080/readyz >/dev/null 2>&1 &&
    [[ -n $(kubectl get mutatingwebhookconfiguration rm-abstract-webhook -o jsonpath='{.webhooks[0].clientConfig.caBundle}' 2>/dev/null) ]]; do
    ((SECONDS < deadline)) || { echo "the operator did not lead and serve the webhook; log:" >&2; tail -n 20 "$state/operator.log" >&2; exit 1; }
    sleep 0.3
done
steps_done+=("operator leading as the chart's ServiceAccount, webhook registered")

step "example workloads"
kubectl apply -n rm-demo -f examples/
kubectl wait -n rm-demo iw --all --for=condition=DeviceSelected --timeout=60s >/dev/null
kubectl wait -n rm-demo iw/smollm2-auto iw/smollm2-cpu --for=condition=Available --timeout=90s >/dev/null
kubectl get iw -n rm-demo -o wide
steps_done+=("$(ls examples/*.yaml | wc -l) workloads placed")

step "kubectl inference status / devices / explain"
kubectl inference status -n rm-demo
kubectl inference devices
kubectl inference explain smollm2-auto -n rm-demo
steps_done+=("kubectl inference shown")

step "node agent (CPU backend) and the unchanged user script with the env the webhook injected"
gguf=$(e2e/fetch-smollm2.sh)
rm -f "$state/agent.sock"
rm-agent --socket "$state/agent.sock" --cache-dir "$state/cache" >"$state/agent.log" 2>&1 &
echo $! >"$state/agent.pid"
until curl -fsS --unix-socket "$state/agent.sock" http://agent/healthz >/dev/null 2>&1; do sleep 0.2; done
pod=$(kubectl get pod -n rm-demo -l rm-abstract.io/workload=smollm2-cpu -o json | python3 -c '
import json, sys
pods = [p for p in json.load(sys.stdin)["items"]
        if any(c["name"].startswith("rm-abstract") for c in p["spec"].get("initContainers", []))]
print(pods[0]["metadata"]["name"] if pods else "")')
[[ -n "$pod" ]] || { echo "no pod of smollm2-cpu carries the injected init container" >&2; exit 1; }
echo "pod $pod as the webhook admitted it:"
kubectl get pod -n rm-demo "$pod" -o jsonpath='{range .spec.initContainers[*]}  init container {.name}: {.image} {.command}{"\n"}{end}{range .spec.containers[0].env[*]}  env {.name}={.value}{.valueFrom.fieldRef.fieldPath}{"\n"}{end}'
# The pod's env, with the two mounts mapped to this machine: the injected
# package directory is python/ of this repository, the agent socket
# directory is the demo agent's.
injected=$(kubectl get pod -n rm-demo "$pod" -o json | python3 -c '
import json, sys
pod = json.load(sys.stdin)
for e in pod["spec"]["containers"][0].get("env", []):
    if "value" in e:
        print(e["name"] + "=" + e["value"])
    elif e.get("valueFrom", {}).get("fieldRef"):
        path = e["valueFrom"]["fieldRef"]["fieldPath"].split(".")
        v = pod
        for p in path:
            v = v.get(p, {})
        print(e["name"] + "=" + (v if isinstance(v, str) else ""))
')
mapped=()
while IFS= read -r kv; do
    kv=${kv//\/rm-abstract-inject/$ROOT\/python}
    kv=${kv//\/var\/run\/rm-abstract\/agent.sock/$state\/agent.sock}
    mapped+=("$kv")
done <<<"$injected"
python3 e2e/smollm2-hf-dir.py "$gguf" "$state/smollm2"
echo "running: python3 examples/generate.py (unchanged; transformers + the injected init)"
out=$(env -i PATH="$PATH" HOME="$HOME" "${mapped[@]}" python3 examples/generate.py "$state/smollm2")
echo "$out"
[[ "$out" == *Paris* ]] || { echo "expected Paris in the answer" >&2; exit 1; }
steps_done+=("unchanged script answered through the agent: Paris")

printf '\n\033[1mdemo summary:\033[0m'
printf ' %s;' "${steps_done[@]}"
printf '\n'
echo "the control plane keeps running: export KUBECONFIG=$kubeconfig; stop it with e2e/cluster.sh down"
