#!/usr/bin/env bash
# An InferenceWorkload whose template is the unchanged user image, for the
# real node (used by e2e/demo.sh and e2e/realnode-test.sh). Its namespace
# enforces Pod Security "restricted" and opts in to injection; the model
# directory reaches the pod through a PersistentVolumeClaim (restricted
# forbids hostPath volumes in pods), bound to a hostPath PersistentVolume.
#   e2e/real-workload.sh apply NAMESPACE NAME DEVICE IMAGE MODELS_DIR [SCRIPT_ARGS...]
#   e2e/real-workload.sh wait-log NAMESPACE NAME PATTERN TIMEOUT_S [LOG_COPY]
#       waits until a pod of the workload logged PATTERN; prints its name and
#       writes the log that had it (with timestamps) to LOG_COPY
#   e2e/real-workload.sh timings NAMESPACE POD LOG_COPY PATTERN
#       seconds from the pod's admission (creation) to its init container's
#       end, its first container start, and the line of LOG_COPY with PATTERN
#   e2e/real-workload.sh runtime NAMESPACE POD
#       what the runtime gave the pod's (last) container, from its OCI spec
#       (crictl inspect): device nodes and the RM_/RBLN_ variables
set -euo pipefail

case ${1:-} in
apply)
    ns=$2 name=$3 device=$4 image=$5 models=$6
    shift 6
    args=("$@")
    ((${#args[@]})) || args=(/models/smollm2)
    kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $ns
  labels:
    pod-security.kubernetes.io/enforce: restricted
    pod-security.kubernetes.io/enforce-version: latest
    rm-abstract.io/demo: "true"
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: models-$ns}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadOnlyMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  claimRef: {namespace: $ns, name: models}
  hostPath: {path: $models, type: Directory}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: models, namespace: $ns}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: models-$ns
  resources: {requests: {storage: 1Gi}}
EOF
    args_yaml=$(printf '"%s", ' "${args[@]}")
    kubectl apply -f - >/dev/null <<EOF
apiVersion: rm-abstract.io/v1alpha1
kind: InferenceWorkload
metadata: {name: $name, namespace: $ns}
spec:
  model: {source: "pvc://models/smollm2"}
  device: $device
  template:
    spec:
      nodeSelector: {rm-abstract.io/real-node: "true"}
      tolerations: [{key: rm-abstract.io/real-node, operator: Exists}]
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
        runAsGroup: 1000
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: app
          image: $image
          imagePullPolicy: Never
          args: [${args_yaml%, }]
          securityContext:
            allowPrivilegeEscalation: false
            capabilities: {drop: [ALL]}
          volumeMounts: [{name: models, mountPath: /models, readOnly: true}]
      volumes: [{name: models, persistentVolumeClaim: {claimName: models, readOnly: true}}]
EOF
    ;;
wait-log)
    ns=$2 name=$3 pattern=$4 timeout=$5 copy=${6:-/dev/null}
    deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        for pod in $(kubectl get pods -n "$ns" -l "rm-abstract.io/workload=$name" -o name 2>/dev/null); do
            # The script exits after its answer and the Deployment restarts
            # it: the answer may be in the previous container's log. The log
            # is kept as read here: the kubelet may remove that container
            # before anyone asks again.
            for prev in false true; do
                log=$(kubectl logs -n "$ns" "$pod" --previous=$prev --timestamps 2>/dev/null || true)
                if grep -q -- "$pattern" <<<"$log"; then
                    printf '%s\n' "$log" >"$copy"
                    echo "${pod#pod/}"
                    exit 0
                fi
            done
        done
        sleep 2
    done
    echo "[real-workload] no pod of $ns/$name logged '$pattern' in ${timeout}s; pods, events and logs:" >&2
    kubectl get pods -n "$ns" -o wide >&2 || true
    kubectl get events -n "$ns" --sort-by=.lastTimestamp 2>/dev/null | tail -n 15 >&2 || true
    for pod in $(kubectl get pods -n "$ns" -l "rm-abstract.io/workload=$name" -o name 2>/dev/null); do
        kubectl logs -n "$ns" "$pod" --all-containers --tail 20 >&2 || true
    done
    exit 1
    ;;
timings)
    ns=$2 pod=$3 copy=$4 pattern=$5
    line=$(grep -m1 -- "$pattern" "$copy" || true)
    answered=${line%% *}
    kubectl get pod -n "$ns" "$pod" -o json | ANSWERED="$answered" python3 -c '
import json, os, sys
from datetime import datetime
def t(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")) if s else None
p = json.load(sys.stdin)
st = p["status"]
created = t(p["metadata"]["creationTimestamp"])
init = (st.get("initContainerStatuses") or [{}])[0].get("state", {}).get("terminated", {})
app = (st.get("containerStatuses") or [{}])[0]
# The first run: the last state when the container was restarted since.
first = app.get("lastState", {}).get("terminated") or next(iter(app.get("state", {}).values()), {})
# The log timestamp has nanoseconds; datetime takes microseconds.
whole, _, frac = os.environ["ANSWERED"].rstrip("Z").partition(".")
answered = t(f"{whole}.{frac[:6] or 0}+00:00") if whole else None
parts = [("init container done", t(init.get("finishedAt"))), ("app container started", t(first.get("startedAt"))),
         ("answer logged", answered)]
print("admitted at " + created.strftime("%H:%M:%S") + "; then " + ", ".join(
    f"{name} +{(when - created).total_seconds():.1f}s" for name, when in parts if when))'
    ;;
runtime)
    ns=$2 pod=$3
    cid=$(e2e/cluster.sh realnode-crictl ps -a --label "io.kubernetes.pod.name=$pod" \
        --label "io.kubernetes.pod.namespace=$ns" --label io.kubernetes.container.name=app -q --latest)
    [[ -n "$cid" ]] || { echo "[real-workload] no container of $ns/$pod on the real node" >&2; exit 1; }
    e2e/cluster.sh realnode-crictl inspect "$cid" | python3 -c '
import json, sys
spec = json.load(sys.stdin)["info"]["runtimeSpec"]
devices = [d["path"] for d in spec.get("linux", {}).get("devices", [])]
print("  device nodes: " + (", ".join(devices) or "none"))
for e in spec["process"]["env"]:
    k, _, v = e.partition("=")
    if k.startswith(("RBLN_", "RM_")) and not k.startswith("RM_POD_"):
        print(f"  env {k}=" + (f"<{len(v)} characters>" if k.endswith("TOKEN") else v))
m = [x["destination"] for x in spec["mounts"] if "rm-abstract" in x["destination"]]
print("  mounts: " + ", ".join(m))'
    ;;
*)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
