#!/usr/bin/env bash
# The main job: brings up the local control plane, adds kwok nodes with GPU,
# ATOM and RNGD capacity, installs the InferenceWorkload CRD, applies the
# examples and shows them. Exits non-zero when any step fails.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
steps_done=()

step "set-up (Debian packages, control-plane binaries; cached after the first run)"
e2e/setup.sh
steps_done+=("set-up")

step "local control plane"
kubeconfig=$(e2e/cluster.sh up | tail -n 1)
export KUBECONFIG=$kubeconfig
PATH="$(e2e/cluster.sh bin-dir):$PATH"
steps_done+=("control plane up")

step "kwok nodes with accelerators"
e2e/cluster.sh node demo-npu rebellions.ai/ATOM=4 furiosa.ai/rngd=2
e2e/cluster.sh node demo-gpu nvidia.com/gpu=8
e2e/cluster.sh node demo-cpu
kubectl get nodes -o custom-columns='NODE:.metadata.name,ATOM:.status.allocatable.rebellions\.ai/ATOM,RNGD:.status.allocatable.furiosa\.ai/rngd,GPU:.status.allocatable.nvidia\.com/gpu,READY:.status.conditions[?(@.type=="Ready")].status'
steps_done+=("3 nodes")

step "InferenceWorkload CRD"
kubectl apply --server-side -f crds/inferenceworkload.yaml
kubectl wait --for=condition=Established crd/inferenceworkloads.rm-abstract.io --timeout=60s
steps_done+=("CRD established")

step "example workloads"
kubectl create namespace rm-demo --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -n rm-demo -f examples/
kubectl get iw -n rm-demo -o wide
steps_done+=("$(ls examples/*.yaml | wc -l) workloads applied")

step "an invalid workload is refused by the apiserver"
if out=$(kubectl apply -n rm-demo -f - 2>&1 <<'YAML'
apiVersion: rm-abstract.io/v1alpha1
kind: InferenceWorkload
metadata: {name: bad}
spec:
  model: {source: gpt2}
  device: tpu
  template: {spec: {containers: [{name: app, image: python}]}}
YAML
); then
    echo "expected a rejection, got: $out" >&2
    exit 1
fi
echo "$out"
steps_done+=("invalid spec rejected")

printf '\n\033[1mdemo summary:\033[0m'
printf ' %s;' "${steps_done[@]}"
printf '\n'
echo "the control plane keeps running: export KUBECONFIG=$kubeconfig; stop it with e2e/cluster.sh down"
