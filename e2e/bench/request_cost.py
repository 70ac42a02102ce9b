"""CPU the apiserver and etcd spend per request, by kind: the writes a
workload costs with the operator, beside the one write of the baseline.

Sends N requests of each kind, one at a time on one TLS connection, and
reads the processes' CPU time (/proc/PID/stat) before and after. Whatever
else runs meanwhile (the controller-manager reacting to Deployments) counts
too, as it would in the real flow.

Usage: request_cost.py KUBECONFIG STATE_DIR NAMESPACE [N]
"""

import base64
import http.client
import json
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

APPLY = "application/apply-patch+yaml"


def tls_context(kubeconfig: dict) -> ssl.SSLContext:
    cluster = kubeconfig["clusters"][0]["cluster"]
    user = kubeconfig["users"][0]["user"]
    tmp = Path(tempfile.mkdtemp())

    def material(src: dict, key: str, name: str) -> str:
        if key + "-data" in src:
            (tmp / name).write_bytes(base64.b64decode(src[key + "-data"]))
            return str(tmp / name)
        return src[key]

    ctx = ssl.create_default_context(cafile=material(cluster, "certificate-authority", "ca.crt"))
    ctx.load_cert_chain(
        material(user, "client-certificate", "client.crt"),
        material(user, "client-key", "client.key"),
    )
    return ctx


def main() -> int:
    kubeconfig = yaml.safe_load(Path(sys.argv[1]).read_text())
    state, ns = Path(sys.argv[2]), sys.argv[3]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 200
    server = urlparse(kubeconfig["clusters"][0]["cluster"]["server"])
    conn = http.client.HTTPSConnection(server.hostname, server.port, context=tls_context(kubeconfig))

    def call(method: str, path: str, body=None, content_type="application/json"):
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": content_type, "Accept": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status >= 300:
            raise SystemExit(f"{method} {path}: {resp.status} {data[:300]!r}")

    pids = {p: int((state / "pids" / f"{p}.pid").read_text()) for p in ("kube-apiserver", "etcd")}

    def cpu_seconds() -> dict:
        out = {}
        for name, pid in pids.items():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return out

    call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    iws = f"/apis/rm-abstract.io/v1alpha1/namespaces/{ns}/inferenceworkloads"
    template = {"spec": {"containers": [{"name": "app", "image": "python:3.12"}]}}

    def workload(i):
        return {"apiVersion": "rm-abstract.io/v1alpha1", "kind": "InferenceWorkload",
                "metadata": {"name": f"w{i}"},
                "spec": {"model": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "template": template}}

    def deployment(i):
        labels = {"app": f"d{i}"}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": f"d{i}", "labels": labels},
                "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels}, **template}}}

    def status(i):
        return {"apiVersion": "rm-abstract.io/v1alpha1", "kind": "InferenceWorkload", "status": {
            "phase": "Pending", "observedGeneration": 1, "replicas": 0, "readyReplicas": 0,
            "device": {"type": "gpu", "resourceName": "nvidia.com/gpu", "count": 1,
                       "reason": f"gpu holds all replicas (1 of 1); considered: gpu {i} free"},
            "conditions": [{"type": "DeviceSelected", "status": "True", "reason": "HighestPriorityWithCapacity",
                            "message": f"gpu holds all replicas; considered: gpu {i} free",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}

    def event(i):
        return {"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": f"w{i}.bench"},
                "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": "rm-abstract.io/operator",
                "reportingInstance": "bench", "action": "SelectDevice", "reason": "DeviceSelected",
                "type": "Normal", "note": f"gpu holds all replicas; considered: gpu {i} free",
                "regarding": {"apiVersion": "rm-abstract.io/v1alpha1", "kind": "InferenceWorkload",
                              "namespace": ns, "name": f"w{i}"}}

    kinds = [
        ("Deployment, server-side apply (the baseline's one write)", lambda i: call(
            "PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/d{i}?fieldManager=bench&force=true",
            deployment(i), APPLY)),
        ("InferenceWorkload, server-side apply (the user's)", lambda i: call(
            "PATCH", f"{iws}/w{i}?fieldManager=bench&force=true", workload(i), APPLY)),
        ("its status, server-side apply (the operator's)", lambda i: call(
            "PATCH", f"{iws}/w{i}/status?fieldManager=rm-operator&force=true", status(i), APPLY)),
        ("an Event (the operator's)", lambda i: call(
            "POST", f"/apis/events.k8s.io/v1/namespaces/{ns}/events", event(i))),
        ("a GET of the workload (what the operator no longer does)", lambda i: call("GET", f"{iws}/w{i}")),
    ]
    for name, send in kinds:
        before, start = cpu_seconds(), time.monotonic()
        for i in range(n):
            send(i)
        wall, after = time.monotonic() - start, cpu_seconds()
        used = {k: 1000 * (after[k] - before[k]) / n for k in after}
        print(f"  {name}: {1000 * wall / n:.2f} ms each; CPU ms each: "
              f"apiserver {used['kube-apiserver']:.2f}, etcd {used['etcd']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
