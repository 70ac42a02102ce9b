#!/usr/bin/env bash
# Tests of charts/rm-abstract and docker/*.Dockerfile, against the local control
# plane (started, or reused when running). Exit status non-zero on any failure.
#
#  1. static: the chart's CRD is crds/inferenceworkload.yaml; the Dockerfiles
#     reference existing paths, packages and binaries, are multi-stage and non-root
#  2. helm lint --strict; helm template for the value variants, with assertions
#     (e2e/chart_assert.py); invalid values are refused
#  3. the rendered config files are accepted by the real rm-operator and
#     rm-device-plugin binaries
#  4. kubectl apply --dry-run=server of the rendered manifests; a real helm install
#  5. RBAC for real: rm-operator (target/debug) runs with a token of the chart's
#     ServiceAccount and the flags of the installed Deployment; an
#     InferenceWorkload gets a Deployment, status, Events, and its pods get the
#     webhook's injection; kubectl auth can-i shows what the account cannot do
#  6. helm uninstall removes the cluster-scoped objects
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CHART=charts/rm-abstract
BIN=$(e2e/cluster.sh bin-dir)
export PATH="$BIN:$PATH"

step() { printf '\n[chart] === %s\n' "$*"; }
ok() { printf '[chart]   ok   %s\n' "$*"; }
failures=0
bad() {
    printf '[chart]   FAIL %s\n' "$*" >&2
    failures=$((failures + 1))
}
expect() { # expect WHAT COMMAND...: the command must succeed
    local what=$1
    shift
    if "$@" >/dev/null 2>&1; then ok "$what"; else bad "$what"; fi
}
expect_not() { # expect_not WHAT COMMAND...: the command must fail
    local what=$1
    shift
    if "$@" >/dev/null 2>&1; then bad "$what"; else ok "$what"; fi
}

# ---------------------------------------------------------------- 1. static
step "static checks"
if cmp -s crds/inferenceworkload.yaml "$CHART/crds/inferenceworkload.yaml"; then
    ok "charts/rm-abstract/crds/inferenceworkload.yaml is identical to crds/inferenceworkload.yaml"
else
    bad "chart CRD differs from crds/inferenceworkload.yaml (cp crds/inferenceworkload.yaml $CHART/crds/)"
fi
python3 e2e/chart_assert.py dockerfiles "$ROOT" || bad "Dockerfile checks"

# ---------------------------------------------------------------- 2. lint and template
step "helm lint --strict"
if helm lint --strict "$CHART" && helm lint --strict "$CHART" --set webhook.certificate.mode=cert-manager \
    && helm lint --strict "$CHART" --set webhook.certificate.mode=provided,webhook.certificate.secretName=x; then
    ok "helm lint --strict (self, cert-manager, provided)"
else
    bad "helm lint --strict"
fi

render() { helm template rmt "$CHART" --namespace rm-system "$@"; }
variant() { # variant NAME HELM-ARGS...
    local name=$1
    shift
    step "helm template: $name ($*)"
    render "$@" | python3 e2e/chart_assert.py render "$name" || bad "template variant $name"
}
variant default
variant cert-manager --set webhook.certificate.mode=cert-manager
variant cert-manager-issuer --set webhook.certificate.mode=cert-manager \
    --set webhook.certificate.certManager.issuerRef.name=corp-ca --set webhook.certificate.certManager.issuerRef.kind=ClusterIssuer
variant provided --set webhook.certificate.mode=provided --set webhook.certificate.secretName=my-webhook-tls
variant servicemonitor --set serviceMonitor.enabled=true --set serviceMonitor.labels.release=prom
variant priorities --set priorities.gpu=120 --set priorities.rbln=50 --set cpuFallback=false \
    --set unschedulableGracePeriod=90s --set resourceNames.rbln=rebellions.ai/npu --set 'devicePlugin.vendors={gpu,rbln}'
variant no-webhook --set webhook.enabled=false
variant trust-remote-code --set agent.allowTrustRemoteCode=true

step "invalid values are refused"
expect_not "unknown device type in priorities" render --set priorities.tpu=10
expect_not "cpu in resourceNames" render --set resourceNames.cpu=x
expect_not "unknown certificate mode" render --set webhook.certificate.mode=vault
expect_not "provided mode without secretName" render --set webhook.certificate.mode=provided
expect_not "agent socket outside hostPaths.socketDir" render --set webhook.agentSocket=/tmp/a.sock
expect_not "unknown device-plugin vendor" render --set 'devicePlugin.vendors={tpu}'
expect_not "agent.allowTrustRemoteCode not a bool" render --set-string agent.allowTrustRemoteCode=yes

# ---------------------------------------------------------------- 3. configs vs binaries
step "rendered configuration files are accepted by the real binaries"
cargo build -q -p rm-operator -p rm-device-plugin
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
WORK=$(mktemp -d /tmp/rm-chart-test.XXXXXX)
render --set priorities.gpu=120 --set cpuFallback=false --set unschedulableGracePeriod=90s >"$WORK/custom.yaml"
python3 - "$WORK" <<'EOF'
import sys, yaml
work = sys.argv[1]
for d in yaml.safe_load_all(open(f"{work}/custom.yaml")):
    if d and d["kind"] == "ConfigMap":
        name = "dp" if "device-plugin" in d["metadata"]["name"] else "op"
        open(f"{work}/{name}.yaml", "w").write(d["data"]["config.yaml"])
EOF
# The operator logs its effective configuration before it needs a cluster.
RM_LOG_FORMAT=json KUBECONFIG=/nonexistent timeout 20 "$BIN/rm-operator" --config "$WORK/op.yaml" \
    --metrics-addr 127.0.0.1:0 >"$WORK/op-config.log" 2>&1 || true
if grep -q '"priority_order":"\[Gpu, Rbln, Furiosa\]"' "$WORK/op-config.log" \
    && grep -q '"cpu_fallback":false' "$WORK/op-config.log" && grep -q '"unschedulable_grace_s":90' "$WORK/op-config.log"; then
    ok "rm-operator --config: priority order gpu, rbln, furiosa (no cpu), grace 90s"
else
    bad "rm-operator did not take the chart's config: $(head -c 600 "$WORK/op-config.log")"
fi
mkdir -p "$WORK/host/sys" "$WORK/host/dev" "$WORK/kubelet" "$WORK/state"
sed -e "s#^hostRoot: .*#hostRoot: $WORK/host#" -e "s#^kubeletDir: .*#kubeletDir: $WORK/kubelet#" \
    -e "s#^stateDir: .*#stateDir: $WORK/state#" "$WORK/dp.yaml" >"$WORK/dp-local.yaml"
timeout 3 "$BIN/rm-device-plugin" --config "$WORK/dp-local.yaml" >"$WORK/dp.log" 2>&1 || true
# Only errors count: without a kubelet here the token collector warns that
# it cannot ask PodResources, which says nothing about the config.
if grep -q "starting" "$WORK/dp.log" && ! grep -qE " ERROR |invalid" "$WORK/dp.log"; then
    ok "rm-device-plugin --config accepts the chart's file"
else
    bad "rm-device-plugin rejected the chart's config: $(head -c 600 "$WORK/dp.log")"
fi

# ---------------------------------------------------------------- 4. cluster
step "local control plane"
export KUBECONFIG
KUBECONFIG=$(e2e/cluster.sh up | tail -n 1)
ID=$(printf '%s' "$$-$RANDOM" | sha256sum | cut -c1-6)
REL=rmchart-$ID
NS=rm-chart-$ID         # release namespace
WNS=rm-chart-wl-$ID     # workload namespace
NODE=rm-chart-gpu-$ID
OTHER=rm-chart-other-$ID
OP_PID=
cleanup() {
    set +e
    [[ -n "$OP_PID" ]] && kill "$OP_PID" 2>/dev/null && wait "$OP_PID" 2>/dev/null
    helm uninstall "$REL" -n "$NS" --wait --timeout 60s >/dev/null 2>&1
    kubectl delete namespace "$NS" "$WNS" "$OTHER" --wait=false --ignore-not-found >/dev/null 2>&1
    kubectl delete node "$NODE" --ignore-not-found >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT
echo "[chart] release $REL in $NS; workloads in $WNS; node $NODE"
kubectl create namespace "$NS" >/dev/null
kubectl create namespace "$WNS" >/dev/null
kubectl create namespace "$OTHER" >/dev/null
kubectl label namespace "$WNS" "rm-abstract.io/chart-test=$ID" >/dev/null
kubectl -n "$OTHER" create secret generic not-yours --from-literal=k=v >/dev/null
read -r WH_PORT MET_PORT < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]; print(*[x.getsockname()[1] for x in s])')

# Values for this cluster: the webhook only sees the test namespace and calls
# the operator process on loopback; the operator watches the test namespace
# only; no pod of the chart is scheduled (unique nodeSelector), so other tests
# on this cluster see no extra pods.
cat >"$WORK/values.yaml" <<EOF
operator:
  watchNamespace: $WNS
  nodeSelector: {rm-abstract.io/chart-test: "$ID"}
devicePlugin:
  nodeSelector: {rm-abstract.io/chart-test: "$ID"}
agent:
  nodeSelector: {rm-abstract.io/chart-test: "$ID"}
webhook:
  url: https://127.0.0.1:$WH_PORT
  extraDnsNames: [127.0.0.1]
  namespaceSelector: {rm-abstract.io/chart-test: "$ID"}
EOF

step "kubectl apply --dry-run=server"
for v in "" "--set webhook.certificate.mode=provided --set webhook.certificate.secretName=x" \
    "--set priorities.gpu=120 --set webhook.enabled=false"; do
    # shellcheck disable=SC2086
    if helm template "$REL" "$CHART" -n "$NS" -f "$WORK/values.yaml" --include-crds $v \
        | kubectl apply --dry-run=server -n "$NS" -f - >"$WORK/dry.log" 2>&1; then
        ok "server-side dry-run accepted ($(grep -c . "$WORK/dry.log") objects) ${v:-[defaults]}"
    else
        bad "server-side dry-run ${v:-[defaults]}: $(cat "$WORK/dry.log")"
    fi
done

step "helm install $REL"
if helm install "$REL" "$CHART" -n "$NS" -f "$WORK/values.yaml" >"$WORK/install.log" 2>&1; then
    ok "helm install"
    grep -q "kubectl inference status" "$WORK/install.log" && ok "NOTES.txt names the next step (kubectl inference status)" \
        || bad "NOTES.txt lacks the next step"
else
    bad "helm install: $(cat "$WORK/install.log")"
fi
F=$REL-rm-abstract
SA=$F-operator
expect "CRD inferenceworkloads.rm-abstract.io exists" kubectl get crd inferenceworkloads.rm-abstract.io
for o in "deployment/$F-operator" "daemonset/$F-device-plugin" "daemonset/$F-agent" "serviceaccount/$SA" \
    "configmap/$F-operator" "service/$F-webhook" "role/$SA" "rolebinding/$SA" "poddisruptionbudget/$F-operator"; do
    expect "$o exists in $NS" kubectl -n "$NS" get "$o"
done
for o in "clusterrole/$SA" "clusterrolebinding/$SA" "mutatingwebhookconfiguration/$F-webhook"; do
    expect "$o exists" kubectl get "$o"
done
expect "operator Deployment wants 2 replicas" \
    test "$(kubectl -n "$NS" get deploy "$F-operator" -o jsonpath='{.spec.replicas}')" = 2

# ---------------------------------------------------------------- 5. RBAC for real
step "the chart's ServiceAccount: token and kubeconfig"
SAKC=$WORK/sa.kubeconfig
e2e/chart-operator.sh kubeconfig "$NS" "$SA" "$SAKC"
who=$(KUBECONFIG=$SAKC kubectl auth whoami -o jsonpath='{.status.userInfo.username}' 2>&1 || true)
expect "token authenticates as system:serviceaccount:$NS:$SA ($who)" test "$who" = "system:serviceaccount:$NS:$SA"

can() { KUBECONFIG=$SAKC kubectl auth can-i "$@"; }
step "kubectl auth can-i --token: what the operator may do"
expect "may watch inferenceworkloads in all namespaces" can watch inferenceworkloads.rm-abstract.io -A
expect "may patch inferenceworkloads/status" can patch inferenceworkloads.rm-abstract.io --subresource=status -n "$WNS"
expect "may create and patch deployments" can patch deployments.apps -n "$WNS"
expect "may list nodes and pods" can list nodes
expect "may create events" can create events.events.k8s.io -n "$WNS"
expect "may update its Lease" can update "leases.coordination.k8s.io/$SA" -n "$NS"
expect "may get/update its webhook Secret" can update "secret/$F-webhook-tls" -n "$NS"
expect "may patch its MutatingWebhookConfiguration" can patch "mutatingwebhookconfigurations.admissionregistration.k8s.io/$F-webhook"
step "kubectl auth can-i --token: what the operator may not do"
expect_not "cannot get Secrets in another namespace ($OTHER)" can get secrets -n "$OTHER"
expect_not "cannot get Secrets in kube-system" can get secrets -n kube-system
expect_not "cannot get Secrets in the workload namespace" can get secrets -n "$WNS"
expect_not "cannot list Secrets cluster-wide" can list secrets -A
expect_not "cannot list Secrets in its own namespace" can list secrets -n "$NS"
expect_not "cannot get other Secrets in its own namespace" can get secret/other -n "$NS"
expect_not "cannot delete nodes" can delete nodes
expect_not "cannot delete deployments" can delete deployments.apps -n "$WNS"
expect_not "cannot create pods" can create pods -n "$WNS"
expect_not "cannot patch other MutatingWebhookConfigurations" can patch mutatingwebhookconfigurations.admissionregistration.k8s.io/other
expect_not "cannot update Leases in another namespace" can update "leases.coordination.k8s.io/$SA" -n "$OTHER"
expect_not "cannot delete inferenceworkloads" can delete inferenceworkloads.rm-abstract.io -n "$WNS"
# And through the API itself, not only the authorizer's answer:
expect_not "GET a Secret in $OTHER is forbidden" env KUBECONFIG="$SAKC" kubectl -n "$OTHER" get secret not-yours

step "rm-operator as the chart's ServiceAccount (flags of the installed Deployment)"
e2e/cluster.sh node "$NODE" nvidia.com/gpu=2 >/dev/null 2>&1 && ok "kwok node $NODE with nvidia.com/gpu=2" || bad "kwok node"
INSTALLER_KUBECONFIG=$KUBECONFIG KUBECONFIG=$SAKC POD_NAME=chart-test-$ID POD_NAMESPACE=$NS RM_LOG=info \
    PATH="$BIN:$PATH" e2e/chart-operator.sh run "$NS" "$F" "$WORK" "127.0.0.1:$MET_PORT" "127.0.0.1:$WH_PORT" \
    >"$WORK/operator.log" 2>&1 &
OP_PID=$!

wait_for() { # wait_for SECONDS WHAT COMMAND...
    local t=$1 what=$2
    shift 2
    local deadline=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            bad "$what (after ${t}s)"
            return 1
        fi
        sleep 1
    done
    ok "$what"
}
holder() { kubectl -n "$NS" get lease "$SA" -o jsonpath='{.spec.holderIdentity}'; }
wait_for 60 "operator holds Lease $NS/$SA" bash -c "[[ \$(kubectl -n $NS get lease $SA -o jsonpath='{.spec.holderIdentity}') == chart-test-$ID ]]"
wait_for 60 "self-managed webhook Secret created in $NS" kubectl -n "$NS" get secret "$F-webhook-tls"
wait_for 60 "operator wrote caBundle into $F-webhook" bash -c \
    "[[ -n \$(kubectl get mutatingwebhookconfiguration $F-webhook -o jsonpath='{.webhooks[0].clientConfig.caBundle}') ]]"

cat >"$WORK/iw.yaml" <<EOF
apiVersion: rm-abstract.io/v1alpha1
kind: InferenceWorkload
metadata: {name: chart-smoke, namespace: $WNS}
spec:
  model: {source: HuggingFaceTB/SmolLM2-135M-Instruct}
  device: gpu
  replicas: 1
  template:
    spec:
      containers:
        - name: app
          image: python:3.12-slim
          command: [python, -c, "print('hi')"]
EOF
kubectl apply -f "$WORK/iw.yaml" >/dev/null
wait_for 60 "InferenceWorkload got a Deployment owned by it" bash -c \
    "[[ \$(kubectl -n $WNS get deploy -o jsonpath='{.items[0].metadata.ownerReferences[0].name}') == chart-smoke ]]"
wait_for 60 "status.device.type is gpu (nvidia.com/gpu)" bash -c \
    "[[ \$(kubectl -n $WNS get iw chart-smoke -o jsonpath='{.status.device.type}/{.status.device.resourceName}') == gpu/nvidia.com/gpu ]]"
expect "status has conditions and a phase" bash -c \
    "[[ -n \$(kubectl -n $WNS get iw chart-smoke -o jsonpath='{.status.phase}{.status.conditions[0].type}') ]]"
wait_for 30 "Events recorded for the workload" bash -c \
    "kubectl -n $WNS get events.events.k8s.io -o jsonpath='{.items[*].regarding.name}' | grep -q chart-smoke"
wait_for 60 "the workload's pod was mutated by the webhook (init container rm-abstract-init)" bash -c \
    "kubectl -n $WNS get pods -o jsonpath='{.items[*].spec.initContainers[*].name}' | grep -q rm-abstract-init"
if grep -qi "forbidden" "$WORK/operator.log"; then
    bad "operator log shows forbidden requests:"
    grep -i forbidden "$WORK/operator.log" | head -5 >&2
else
    ok "no forbidden request in the operator's log"
fi
kill "$OP_PID" 2>/dev/null && wait "$OP_PID" 2>/dev/null || true
OP_PID=
kubectl delete -f "$WORK/iw.yaml" --wait=false >/dev/null 2>&1 || true

# ---------------------------------------------------------------- 6. uninstall
step "helm uninstall $REL"
expect "helm uninstall" helm uninstall "$REL" -n "$NS" --wait --timeout 60s
expect_not "MutatingWebhookConfiguration removed" kubectl get mutatingwebhookconfiguration "$F-webhook"
expect_not "ClusterRole removed" kubectl get clusterrole "$SA"
expect_not "ClusterRoleBinding removed" kubectl get clusterrolebinding "$SA"

if ((failures > 0)); then
    [[ -f "$WORK/operator.log" ]] && { echo "[chart] operator log (tail):"; tail -n 30 "$WORK/operator.log"; } >&2
    printf '\n[chart] %d check(s) FAILED\n' "$failures" >&2
    exit 1
fi
printf '\n[chart] all chart checks passed\n'
