#!/usr/bin/env bash
# Faults on the real node, after e2e/demo.sh left it running with the chart
# installed and the workload rm-real/smollm2-real answering:
#   1. the kubelet restarts: rm-device-plugin registers again and the node's
#      allocatable comes back;
#   2. the agent pod is deleted: its DaemonSet brings it back, the compile
#      cache survives on the hostPath, and the user pod's next run answers;
#   3. the device plugin's container is killed: allocations keep working (a
#      new user pod gets its agent socket and answers) while it restarts.
# Each step asserts what it says and exits non-zero otherwise.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export KUBECONFIG
KUBECONFIG=$(e2e/cluster.sh kubeconfig)
PATH="$(e2e/cluster.sh bin-dir):$PATH"
NS=rm-system
NODE=rm-real-node
SOCKET=/var/run/rm-abstract/agent.sock

ok() { printf 'ok  %s\n' "$*"; }
fail() {
    printf 'FAIL %s\n' "$*" >&2
    exit 1
}
pod_of() { kubectl get pods -n "$NS" -l "app.kubernetes.io/name=$1" --field-selector=status.phase=Running -o jsonpath='{.items[0].metadata.name}'; }
allocatable() { kubectl get node "$NODE" -o jsonpath="{.status.allocatable.${1//./\\.}}"; }
# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds
# (a function where the condition must be evaluated anew each time).
wait_until() {
    local timeout=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "$what: not within ${timeout}s"
        sleep 1
    done
}
registrations() { kubectl logs -n "$NS" "$(pod_of rm-device-plugin)" | grep -c 'registered with the kubelet' || true; }
# The agent lists every namespace's entries to its admin token only: read it
# from the Secret the agent pod mounts (volume admin-token), as kubectl
# inference cache does.
admin_token() {
    local secret
    secret=$(kubectl get pod -n "$NS" "$(pod_of rm-agent)" -o jsonpath='{.spec.volumes[?(@.name=="admin-token")].secret.secretName}')
    kubectl get secret -n "$NS" "$secret" -o jsonpath='{.data.token}' | base64 -d
}
cache_entries() {
    curl -fsS --unix-socket "$SOCKET" -H "X-RM-Token: $(admin_token)" http://agent/v1/cache |
        python3 -c 'import json,sys; print(len(json.load(sys.stdin)["entries"]))'
}

pgrep -x kubelet >/dev/null || fail "no kubelet runs: start the real node with e2e/demo.sh first"
[[ $(allocatable rebellions.ai/ATOM) == 2 ]] || fail "rm-real-node does not advertise its 2 fake ATOMs"

echo "=== 1. kubelet restart"
before=$(registrations)
t0=$SECONDS
e2e/cluster.sh realnode-restart-kubelet
registered_again() { (($(registrations) > before)); }
atoms_back() { [[ $(allocatable rebellions.ai/ATOM) == 2 ]]; }
wait_until 120 "the device plugin registered again" registered_again
wait_until 120 "allocatable ATOM back to 2" atoms_back
ok "kubelet restarted: the plugin registered again ($(registrations) registrations) and allocatable came back in $((SECONDS - t0))s"

echo "=== 2. agent pod deleted"
entries=$(cache_entries)
((entries > 0)) || fail "the agent's cache is empty before the fault (the demo's compile should be there)"
old=$(pod_of rm-agent)
kubectl delete pod -n "$NS" "$old" --wait=true >/dev/null
wait_until 120 "a new agent pod Ready" kubectl wait -n "$NS" pod -l app.kubernetes.io/name=rm-agent --for=condition=Ready --timeout=5s
new=$(pod_of rm-agent)
[[ "$new" != "$old" ]] || fail "the agent pod was not replaced"
wait_until 60 "the agent socket answers" curl -fsS --unix-socket "$SOCKET" http://agent/healthz
after=$(cache_entries)
((after >= entries)) || fail "cache entries: $entries before, $after after the agent pod was replaced"
ok "agent pod $old replaced by $new; cache entries kept ($entries before, $after after)"
user=$(kubectl get pods -n rm-real -l rm-abstract.io/workload=smollm2-real -o name | head -n1)
kubectl delete -n rm-real "$user" --wait=true >/dev/null
t0=$SECONDS
pod=$(e2e/real-workload.sh wait-log rm-real smollm2-real Paris 300)
ok "the user pod's next run answered through the new agent ($pod, $((SECONDS - t0))s after its old pod was deleted)"

echo "=== 3. device plugin container killed"
dp=$(pod_of rm-device-plugin)
cid=$(kubectl get pod -n "$NS" "$dp" -o jsonpath='{.status.containerStatuses[0].containerID}')
restarts=$(kubectl get pod -n "$NS" "$dp" -o jsonpath='{.status.containerStatuses[0].restartCount}')
e2e/cluster.sh realnode-crictl stop --timeout 0 "${cid#containerd://}" >/dev/null
user=$(kubectl get pods -n rm-real -l rm-abstract.io/workload=smollm2-real -o name | head -n1)
kubectl delete -n rm-real "$user" --wait=true >/dev/null
pod=$(e2e/real-workload.sh wait-log rm-real smollm2-real Paris 300)
restarted() { (($(kubectl get pod -n "$NS" "$dp" -o jsonpath='{.status.containerStatuses[0].restartCount}') > restarts)); }
wait_until 120 "the device plugin container restarted" restarted
ok "device plugin container killed and restarted by the kubelet; a new user pod ($pod) was allocated and answered"
echo "real-node fault tests: all passed"
