#!/usr/bin/env bash
# rm-operator as the Helm chart installed it, run here as a process: with a
# token of the chart's ServiceAccount (so its RBAC is what is tested) and the
# flags and config file of the installed Deployment. kwok runs no containers,
# so this process stands in for the operator pod. Used by e2e/chart-test.sh
# and e2e/demo.sh.
#   e2e/chart-operator.sh kubeconfig NAMESPACE SERVICEACCOUNT OUT
#       writes a kubeconfig that authenticates as the ServiceAccount
#   e2e/chart-operator.sh run NAMESPACE FULLNAME WORKDIR METRICS_ADDR WEBHOOK_ADDR
#       runs rm-operator (from PATH) with the Deployment's flags; the caller
#       sets KUBECONFIG (the ServiceAccount's), POD_NAME and POD_NAMESPACE
set -euo pipefail

case ${1:-} in
kubeconfig)
    ns=$2 sa=$3 out=$4
    token=$(kubectl -n "$ns" create token "$sa" --duration 2h)
    server=$(kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.server}')
    ca=$(mktemp)
    kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' | base64 -d >"$ca"
    KUBECONFIG=$out kubectl config set-cluster c --server="$server" --certificate-authority="$ca" --embed-certs >/dev/null
    rm -f "$ca"
    KUBECONFIG=$out kubectl config set-credentials sa --token="$token" >/dev/null
    KUBECONFIG=$out kubectl config set-context c --cluster=c --user=sa >/dev/null
    KUBECONFIG=$out kubectl config use-context c >/dev/null
    ;;
run)
    ns=$2 full=$3 work=$4 metrics_addr=$5 webhook_addr=$6
    # The Deployment and its ConfigMap are read with the installer's
    # credentials (INSTALLER_KUBECONFIG): the ServiceAccount needs no access.
    kc=${INSTALLER_KUBECONFIG:-$KUBECONFIG}
    KUBECONFIG=$kc kubectl -n "$ns" get configmap "$full-operator" -o jsonpath='{.data.config\.yaml}' \
        >"$work/operator-config.yaml"
    mapfile -t args < <(KUBECONFIG=$kc kubectl -n "$ns" get deploy "$full-operator" -o json | python3 -c '
import json, sys
for a in json.load(sys.stdin)["spec"]["template"]["spec"]["containers"][0]["args"]:
    print(a)')
    run_args=()
    for a in "${args[@]}"; do
        case $a in
            --config=*) run_args+=("--config=$work/operator-config.yaml") ;;
            --metrics-addr=*) run_args+=("--metrics-addr=$metrics_addr") ;;
            --webhook-addr=*) run_args+=("--webhook-addr=$webhook_addr") ;;
            *) run_args+=("$a") ;;
        esac
    done
    echo "[chart-operator] rm-operator ${run_args[*]}" >&2
    exec rm-operator "${run_args[@]}"
    ;;
*)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
