#!/usr/bin/env bash
# The main job: brings up the local control plane, registers rm-device-plugin
# on fake device trees with the kubelet's device manager and gives kwok nodes
# the GPU, ATOM and RNGD capacity it advertised; adds a real node (kubelet,
# containerd, runc, CNI, kube-proxy), builds the images and installs the Helm
# chart with them, so the operator, device plugin and agent run as real pods;
# applies the examples on the kwok nodes and shows where each runs and why
# (kubectl inference); then runs the unchanged user image on the real node,
# non-root under Pod Security restricted, generating with SmolLM2 through the
# agent pod. Exits non-zero when any step fails.
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
# Workloads that tests left on this cluster (their namespaces carry
# rm-abstract.io/e2e=true) keep Deployments whose pods wait for devices: they
# would take the demo nodes' ATOMs and GPUs the moment the nodes appear.
if [[ -n $(kubectl get namespace -l rm-abstract.io/e2e=true -o name) ]]; then
    echo "deleting namespaces that tests left (label rm-abstract.io/e2e=true)"
    kubectl delete namespace -l rm-abstract.io/e2e=true --timeout=180s >/dev/null ||
        echo "warning: some test namespaces are still terminating" >&2
fi
for node in demo-npu demo-gpu demo-cpu; do
    # shellcheck disable=SC2086
    e2e/cluster.sh node "$node" ${reported[$node]}
done
kubectl get nodes -o custom-columns='NODE:.metadata.name,ATOM:.status.allocatable.rebellions\.ai/ATOM,RNGD:.status.allocatable.furiosa\.ai/rngd,GPU:.status.allocatable.nvidia\.com/gpu,READY:.status.conditions[?(@.type=="Ready")].status'
steps_done+=("3 nodes")

state=$(dirname "$kubeconfig")/demo
mkdir -p "$state"

step "a real node: kubelet, containerd, runc, CNI and kube-proxy of the control plane's release"
e2e/cluster.sh realnode rm-real-node
# Only what is meant for it lands there: the chart's pods and the real
# workloads tolerate this taint; the kwok examples do not.
kubectl taint node rm-real-node rm-abstract.io/real-node=true:NoSchedule --overwrite >/dev/null
steps_done+=("real node Ready")

step "images: built with buildah from local Debian bases, imported into the node's containerd"
e2e/images.sh import
declare -A image=()
while IFS='=' read -r name ref; do image[$name]=$ref; done < <(e2e/images.sh refs)
steps_done+=("5 images built and imported")

step "TEST DOUBLE accelerators on the real node: a fake sysfs tree, device nodes made with mknod"
# No accelerator exists here. The device plugin reads a fake sysfs tree
# (e2e/devicemanager.sh -layout) and the real /dev, where the fake tree's
# device nodes are made as character devices with /dev/null's numbers, so
# that a container given /dev/rbln0 gets a harmless node.
fake=$(e2e/cluster.sh realnode-dir)/fake-host
e2e/devicemanager.sh - -layout "$fake" -atoms 2 -rngds 1 -gpus 1
e2e/cluster.sh realnode-fake-devices "$fake"
steps_done+=("fake devices laid out")

step "helm install charts/rm-abstract with the built images: operator, device plugin and agent as pods on the real node"
chart_ns=rm-system
ref_repo() { echo "${1%:*}"; }
ref_tag() { echo "${1##*:}"; }
on_real_node='nodeSelector: {rm-abstract.io/real-node: "true"}'
cat >"$state/values.yaml" <<EOF
operator:
  image: {repository: $(ref_repo "${image[operator]}"), tag: $(ref_tag "${image[operator]}"), pullPolicy: Never}
  $on_real_node
  tolerations: [{key: rm-abstract.io/real-node, operator: Exists}]
devicePlugin:
  image: {repository: $(ref_repo "${image[device-plugin]}"), tag: $(ref_tag "${image[device-plugin]}"), pullPolicy: Never}
  $on_real_node
  hostPaths: {sys: $fake/sys, procDriver: $fake/proc/driver}
agent:
  image: {repository: $(ref_repo "${image[agent]}"), tag: $(ref_tag "${image[agent]}"), pullPolicy: Never}
  $on_real_node
serve:
  image: {repository: $(ref_repo "${image[serve]}"), tag: $(ref_tag "${image[serve]}"), pullPolicy: Never}
webhook:
  initImage: {repository: $(ref_repo "${image[python-init]}"), tag: $(ref_tag "${image[python-init]}"), pullPolicy: Never}
  namespaceSelector: {rm-abstract.io/demo: "true"}
  failurePolicy: Fail
EOF
t0=$SECONDS
helm upgrade --install rm-abstract charts/rm-abstract -n "$chart_ns" --create-namespace \
    -f "$state/values.yaml" --wait --timeout 5m >"$state/helm.log" ||
    { tail -n 5 "$state/helm.log"; kubectl get pods -n "$chart_ns" -o wide; exit 1; }
kubectl get pods -n "$chart_ns" -o wide
echo "the chart's pods Running and Ready $((SECONDS - t0))s after helm install"
deadline=$((SECONDS + 120))
allocatable='{.status.allocatable.rebellions\.ai/ATOM} {.status.allocatable.furiosa\.ai/rngd} {.status.allocatable.nvidia\.com/gpu} {.status.allocatable.rm-abstract\.io/agent}'
until [[ -n $(kubectl get mutatingwebhookconfiguration rm-abstract-webhook -o jsonpath='{.webhooks[0].clientConfig.caBundle}' 2>/dev/null) &&
    $(kubectl get node rm-real-node -o jsonpath="$allocatable") =~ ^2\ 1\ 1\ [1-9] ]]; do
    ((SECONDS < deadline)) || {
        echo "the webhook's CA or the node's devices did not appear (ATOM RNGD GPU agent: $(kubectl get node rm-real-node -o jsonpath="$allocatable"))" >&2
        kubectl logs -n "$chart_ns" -l app.kubernetes.io/name=rm-device-plugin --tail 20 >&2 || true
        exit 1
    }
    sleep 1
done
echo "rm-real-node allocatable, as the kubelet took it from rm-device-plugin:"
kubectl get node rm-real-node -o json | python3 -c '
import json, sys
for k, v in sorted(json.load(sys.stdin)["status"]["allocatable"].items()):
    if "/" in k: print(f"  {k}: {v}")'
steps_done+=("chart running on the real node, device plugin registered with the kubelet")

step "kwok examples: the operator pod places them, the webhook (through its Service) injects them"
kubectl delete namespace rm-demo --ignore-not-found --timeout=120s >/dev/null
kubectl create namespace rm-demo >/dev/null
kubectl label namespace rm-demo rm-abstract.io/demo=true --overwrite >/dev/null
kubectl apply -n rm-demo -f examples/
demo_state() {
    kubectl get iw,pods -n rm-demo -o wide
    kubectl get nodes -o wide
    kubectl get events -n rm-demo --sort-by=.lastTimestamp | tail -n 20
    kubectl get iw -n rm-demo -o jsonpath='{range .items[*]}{.metadata.name}: {.status.conditions[?(@.type=="Available")].message}{"\n"}{end}'
}
kubectl wait -n rm-demo iw --all --for=condition=DeviceSelected --timeout=60s >/dev/null || { demo_state; exit 1; }
kubectl wait -n rm-demo iw/smollm2-auto iw/smollm2-cpu --for=condition=Available --timeout=180s >/dev/null ||
    { demo_state; exit 1; }
kubectl get iw -n rm-demo -o wide
steps_done+=("$(ls examples/*.yaml | wc -l) workloads placed")

step "kubectl inference status / devices / explain"
kubectl inference status -n rm-demo
kubectl inference devices
kubectl inference explain smollm2-auto -n rm-demo
steps_done+=("kubectl inference shown")

step "the unchanged user image on the real node, non-root under Pod Security restricted"
gguf=$(e2e/fetch-smollm2.sh)
models=$(e2e/cluster.sh realnode-dir)/models
python3 e2e/smollm2-hf-dir.py "$gguf" "$models/smollm2" >/dev/null
# A real copy, not the link the helper makes: the pod sees only the volume.
cp --remove-destination "$(readlink -f "$models/smollm2/$(basename "$gguf")")" "$models/smollm2/$(basename "$gguf")"
chmod -R a+rX "$models"
e2e/real-workload.sh apply rm-real smollm2-real cpu "${image[demo-app]}" "$models"
t0=$SECONDS
pod=$(e2e/real-workload.sh wait-log rm-real smollm2-real Paris 600 "$state/answer.log")
echo "pod $pod, as the webhook admitted it:"
kubectl get pod -n rm-real "$pod" -o jsonpath='{range .spec.initContainers[*]}  init container {.name}: {.image}{"\n"}{end}  pod securityContext: {.spec.securityContext}{"\n"}{range .spec.containers[0].env[*]}  env {.name}={.value}{.valueFrom.fieldRef.fieldPath}{"\n"}{end}'
echo "kubectl logs, the run that answered ($((SECONDS - t0))s after the workload was applied):"
cut -d' ' -f2- "$state/answer.log" | tail -n 3
echo "pod start: $(e2e/real-workload.sh timings rm-real "$pod" "$state/answer.log" Paris)"
echo "what the runtime gave its container:"
e2e/real-workload.sh runtime rm-real "$pod"
steps_done+=("unchanged image on the real node answered: Paris")

step "a served workload on the real node: rm-serve's OpenAI-compatible endpoint, asked with curl and the openai client"
# No container of the user's: spec.serve runs rm-abstract's own serving image
# (the template only pins the pod to the real node). The model files come
# from the same claim, uploaded to the agent by the server.
kubectl apply -f - >/dev/null <<EOF
apiVersion: rm-abstract.io/v1alpha1
kind: InferenceWorkload
metadata: {name: smollm2-served, namespace: rm-real}
spec:
  model: {source: "pvc://models/smollm2"}
  device: cpu
  serve: {modelName: smollm2}
  template:
    spec:
      nodeSelector: {rm-abstract.io/real-node: "true"}
      tolerations: [{key: rm-abstract.io/real-node, operator: Exists}]
EOF
t0=$SECONDS
deadline=$((SECONDS + 600))
until endpoint=$(kubectl get iw -n rm-real smollm2-served -o jsonpath='{.status.endpoint}') && [[ -n $endpoint ]]; do
    ((SECONDS < deadline)) || {
        kubectl get iw,pods,svc -n rm-real -o wide
        kubectl logs -n rm-real -l rm-abstract.io/workload=smollm2-served --all-containers --tail 20 || true
        echo "smollm2-served got no endpoint" >&2
        exit 1
    }
    sleep 2
done
echo "status.endpoint $endpoint, $((SECONDS - t0))s after the workload was applied (Ready: compiled and loaded)"
kubectl get iw -n rm-real smollm2-served
# The Service through the apiserver's proxy (kubectl proxy on loopback): from
# this host, the path the apiserver takes to the Service's pod.
kubectl proxy --port=0 >"$state/proxy.log" 2>&1 &
proxy_pid=$!
trap 'kill $proxy_pid 2>/dev/null || true' EXIT
deadline=$((SECONDS + 30))
until port=$(sed -n 's/^Starting to serve on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$state/proxy.log") && [[ -n $port ]]; do
    ((SECONDS < deadline)) || { cat "$state/proxy.log" >&2; exit 1; }
    sleep 0.2
done
base="http://127.0.0.1:$port/api/v1/namespaces/rm-real/services/http:smollm2-served:http/proxy/v1"
echo "curl .../v1/completions (the Service, through the apiserver):"
answer=$(curl -sS --max-time 120 "$base/completions" -H 'Content-Type: application/json' \
    -d '{"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}')
echo "  $answer"
[[ $answer == *Paris* ]] || { echo "the served model did not answer Paris" >&2; exit 1; }
echo "curl -N, the same with \"stream\": true (server-sent events):"
curl -sSN --max-time 120 "$base/completions" -H 'Content-Type: application/json' \
    -d '{"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stream": true}' \
    >"$state/sse.txt"
sed 's/^/  /' "$state/sse.txt" | head -n 4
events=$(grep -c '^data: {' "$state/sse.txt" || true)
echo "  ... $events data events, last line: $(grep -v '^$' "$state/sse.txt" | tail -n 1)"
[[ $events -ge 2 && $(grep -v '^$' "$state/sse.txt" | tail -n 1) == "data: [DONE]" ]] ||
    { echo "the stream was not server-sent events ending in [DONE]" >&2; exit 1; }
echo "the official openai client (chat, streamed), unchanged but for base_url:"
python3 e2e/openai-chat.py "$base" smollm2
curl -sS --max-time 30 "$base/devices/status" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print("  /v1/devices/status: device", d.get("device"), "runs on", (d.get("running") or {}).get("device_type"),
      "via backend", (d.get("running") or {}).get("backend"))'
echo "  rm-serve's metrics:"
curl -sS --max-time 30 "${base%/v1}/metrics" | grep -E '^rm_serve_[a-z_]*(requests|tokens)_total' | head -n 6 | sed 's/^/    /'
kill $proxy_pid 2>/dev/null || true
trap - EXIT
steps_done+=("served workload answered Paris through its Service (curl and the openai client)")

step "the same image on a (TEST DOUBLE) ATOM: devices and token for real, then the clear no-SDK error"
# The kubelet allocates a fake ATOM through rm-device-plugin; the container
# gets its device node, RBLN_DEVICES and its token. No RBLN SDK exists here,
# so the agent cannot compile for it, and rm_abstract refuses to fall back to
# the pod's CPU while it holds an accelerator: the script fails with one
# clear line, which the operator puts in the workload's status.
e2e/real-workload.sh apply rm-real smollm2-atom rbln "${image[demo-app]}" "$models"
deadline=$((SECONDS + 300))
until [[ $(kubectl get iw -n rm-real smollm2-atom -o jsonpath='{.status.phase}') == Failed ]]; do
    ((SECONDS < deadline)) || { kubectl get iw,pods -n rm-real -o wide; echo "smollm2-atom did not report its failure" >&2; exit 1; }
    sleep 2
done
atom_pod=$(kubectl get pods -n rm-real -l rm-abstract.io/workload=smollm2-atom -o jsonpath='{.items[0].metadata.name}')
echo "what the runtime gave pod $atom_pod:"
e2e/real-workload.sh runtime rm-real "$atom_pod"
echo "kubectl logs (its last line; the container restarts, so this run's or the previous one's):"
e2e/real-workload.sh wait-log rm-real smollm2-atom RMUnavailableError 120 "$state/atom.log" >/dev/null
last=$(tail -n 1 "$state/atom.log" | cut -d' ' -f2-)
echo "$last"
[[ "$last" == *RMUnavailableError* ]] || { echo "the pod's log does not end with rm_abstract's error" >&2; exit 1; }
echo "the workload's status:"
kubectl get iw -n rm-real smollm2-atom
kubectl get iw -n rm-real smollm2-atom -o jsonpath='  Available: {.status.conditions[?(@.type=="Available")].message}{"\n"}'
kubectl delete iw -n rm-real smollm2-atom --wait=false >/dev/null
steps_done+=("ATOM workload failed clearly (no RBLN SDK here)")

printf '\n\033[1mdemo summary:\033[0m'
printf ' %s;' "${steps_done[@]}"
printf '\n'
echo "the control plane keeps running: export KUBECONFIG=$kubeconfig; stop it with e2e/cluster.sh down"
