#!/usr/bin/env python3
"""Assertions for e2e/chart-test.sh (stdlib + PyYAML).

  chart_assert.py render VARIANT < manifests.yaml   checks `helm template` output
  chart_assert.py dockerfiles ROOT                   checks docker/*.Dockerfile
"""
import base64
import os
import re
import sys

import yaml

FAILED = []


def check(cond, what):
    print(f"  {'ok  ' if cond else 'FAIL'} {what}")
    if not cond:
        FAILED.append(what)


def objs(stream):
    out = {}
    for d in yaml.safe_load_all(stream):
        if d:
            out.setdefault(d["kind"], []).append(d)
    return out


def one(o, kind, contains=""):
    xs = [x for x in o.get(kind, []) if contains in x["metadata"]["name"]]
    assert len(xs) == 1, f"expected one {kind} containing {contains!r}, got {len(xs)}"
    return xs[0]


def args_of(dep):
    return dep["spec"]["template"]["spec"]["containers"][0]["args"]


def arg(args, flag):
    for a in args:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def rules(role):
    return role["rules"]


def grants(role, group, resource, verb, name=None):
    for r in rules(role):
        if group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]:
            if name is None or not r.get("resourceNames") or name in r["resourceNames"]:
                return r
    return None


def common(o, variant):
    dep = one(o, "Deployment", "operator")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    check(dep["spec"]["replicas"] == 2, "operator Deployment has 2 replicas")
    env = {e["name"]: e for e in c.get("env", [])}
    check(env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
          "POD_NAME from metadata.name")
    check(env.get("POD_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace",
          "POD_NAMESPACE from metadata.namespace")
    a = args_of(dep)
    check(arg(a, "--config") == "/etc/rm-operator/config.yaml", "operator reads --config from the ConfigMap mount")
    check(arg(a, "--lease-name") is not None, "operator has --lease-name")
    check((arg(a, "--serve-image") or "").startswith("ghcr.io/rm-abstract/serve:"),
          "operator --serve-image from serve.image")
    sc = c["securityContext"]
    psc = spec["securityContext"]
    check(psc.get("runAsNonRoot") is True and sc.get("readOnlyRootFilesystem") is True
          and sc.get("allowPrivilegeEscalation") is False and sc["capabilities"]["drop"] == ["ALL"],
          "operator: non-root, read-only root fs, no privilege escalation, drop ALL")
    for kind in ("DaemonSet",):
        for ds in o.get(kind, []):
            s = ds["spec"]["template"]["spec"]
            csc = s["containers"][0]["securityContext"]
            check(csc.get("readOnlyRootFilesystem") is True, f"{ds['metadata']['name']}: read-only root fs")
            check(s.get("automountServiceAccountToken") is False, f"{ds['metadata']['name']}: no API token")
    agent = one(o, "DaemonSet", "agent")
    at = agent["spec"]["template"]
    check(at["metadata"]["labels"].get("app.kubernetes.io/name") == "rm-agent",
          "agent pods labelled app.kubernetes.io/name=rm-agent (kubectl inference cache)")
    ports = at["spec"]["containers"][0]["ports"]
    check(any(p["name"] == "http" for p in ports), "agent has a container port named http")
    aargs = args_of(agent)
    check(arg(aargs, "--socket") == "/var/run/rm-abstract/agent.sock", "agent --socket in the shared socket dir")
    check(arg(aargs, "--state-dir") == "/var/lib/rm-abstract/device-plugin", "agent reads the device plugin's tokens")
    check(arg(aargs, "--admin-token-file") == "/etc/rm-abstract/admin/token", "agent reads its admin token file")
    check([arg(aargs, f) for f in ("--max-upload-bytes", "--namespace-quota", "--min-free-disk")]
          == ["64G", "200G", "10G"], "agent storage limits from values (64G, 200G, 10G)")
    adm = [v for v in at["spec"]["volumes"] if v["name"] == "admin-token"]
    secret = one(o, "Secret", "agent-admin")
    check(len(adm) == 1 and adm[0]["secret"]["secretName"] == secret["metadata"]["name"],
          "agent mounts its admin Secret through the volume named admin-token (kubectl inference cache)")
    check(len(base64.b64decode(secret["data"]["token"])) >= 16, "admin token of at least 16 characters")
    hp = {v["name"]: v["hostPath"]["path"] for v in at["spec"]["volumes"] if "hostPath" in v}
    check(hp.get("socket") == "/var/run/rm-abstract" and hp.get("state") == "/var/lib/rm-abstract",
          "agent hostPaths: /var/run/rm-abstract, /var/lib/rm-abstract")
    aenv = {e["name"]: e.get("value") for e in at["spec"]["containers"][0].get("env", [])}
    want_trc = "true" if variant == "trust-remote-code" else "false"
    check(aenv.get("RM_ALLOW_TRUST_REMOTE_CODE") == want_trc,
          f"agent RM_ALLOW_TRUST_REMOTE_CODE={want_trc} (agent.allowTrustRemoteCode)")
    dp = one(o, "DaemonSet", "device-plugin")
    dps = dp["spec"]["template"]["spec"]
    hp = {v["hostPath"]["path"] for v in dps["volumes"] if "hostPath" in v}
    for p in ("/var/lib/kubelet/device-plugins", "/sys", "/dev", "/var/lib/rm-abstract"):
        check(p in hp, f"device plugin mounts hostPath {p}")
    ro = {m["mountPath"] for m in dps["containers"][0]["volumeMounts"] if m.get("readOnly")}
    check({"/host/sys", "/host/dev"} <= ro, "device plugin: /sys and /dev read-only")
    check(dps["containers"][0]["securityContext"]["capabilities"]["drop"] == ["ALL"], "device plugin drops ALL")
    # RBAC
    cr = one(o, "ClusterRole")
    role = one(o, "Role")
    check(grants(cr, "rm-abstract.io", "inferenceworkloads", "watch") is not None, "ClusterRole: watch inferenceworkloads")
    check(grants(cr, "rm-abstract.io", "inferenceworkloads/status", "patch") is not None, "ClusterRole: patch status")
    check(grants(cr, "rm-abstract.io", "inferenceworkloads/scale", "get") is not None, "ClusterRole: get scale")
    check(grants(cr, "apps", "deployments", "patch") is not None, "ClusterRole: patch deployments")
    check(grants(cr, "scheduling.k8s.io", "priorityclasses", "watch") is not None,
          "ClusterRole: watch priorityclasses (the order of waiting workloads)")
    check(grants(cr, "", "secrets", "get") is None, "ClusterRole grants nothing on secrets")
    check(grants(cr, "", "services", "patch") is not None and grants(cr, "", "services", "delete") is not None,
          "ClusterRole: patch and delete services (served workloads)")
    check(not any("*" in r["verbs"] for r in rules(cr) + rules(role)), "no wildcard verbs")
    check(not any("delete" in r["verbs"] and r["resources"] != ["services"] for r in rules(cr) + rules(role)),
          "no delete but of services")
    check(not any("*" in r["resources"] or "*" in r["apiGroups"] for r in rules(cr) + rules(role)),
          "no wildcard resources or groups")
    lease = grants(role, "coordination.k8s.io", "leases", "update")
    check(lease is not None and lease.get("resourceNames") == [arg(a, "--lease-name")],
          "Role: update on its own Lease only")
    check(one(o, "ClusterRoleBinding")["subjects"][0]["name"] == dep["spec"]["template"]["spec"]["serviceAccountName"],
          "bindings name the operator's ServiceAccount")
    return dep, a, cr, role


def render(variant, stream):
    o = objs(stream)
    kinds = sorted(o)
    print(f"  kinds: {', '.join(f'{k}×{len(v)}' for k, v in sorted(o.items()))}")
    if variant == "no-webhook":
        dep, a, cr, role = common(o, variant)
        check("MutatingWebhookConfiguration" not in o, "no MutatingWebhookConfiguration")
        check(arg(a, "--webhook-addr") is None, "operator serves no webhook")
        check(grants(role, "", "secrets", "get") is None, "no Secret access without the webhook")
        return
    dep, a, cr, role = common(o, variant)
    mwc = one(o, "MutatingWebhookConfiguration")
    wh = mwc["webhooks"][0]
    check(arg(a, "--webhook-config-name") == mwc["metadata"]["name"], "operator manages the chart's webhook configuration")
    check(wh["name"] == "pods.inject.rm-abstract.io" and wh["sideEffects"] == "None", "webhook name and sideEffects")
    check(wh["rules"][0]["resources"] == ["pods"] and wh["rules"][0]["operations"] == ["CREATE"], "webhook on pod CREATE")
    check(arg(a, "--webhook-failure-policy") == wh["failurePolicy"], "failurePolicy agrees with the operator flag")
    mwc_rule = grants(cr, "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "patch")
    check(mwc_rule is not None and mwc_rule.get("resourceNames") == [mwc["metadata"]["name"]]
          and sorted(mwc_rule["verbs"]) == ["get", "patch"],
          "ClusterRole: get/patch on its own MutatingWebhookConfiguration only")
    svc = [s for s in o["Service"] if s["metadata"]["name"] == arg(a, "--webhook-service-name")]
    check(len(svc) == 1 and svc[0]["spec"]["ports"][0]["port"] == 443, "webhook Service on 443")
    anns = mwc["metadata"].get("annotations") or {}
    secret_rules = [r for r in rules(role) if "secrets" in r["resources"]]
    if variant in ("default", "servicemonitor", "priorities"):
        check(arg(a, "--webhook-cert-mode") == "self", "cert mode self")
        check("caBundle" not in wh["clientConfig"], "caBundle left to the operator")
        check("cert-manager.io/inject-ca-from" not in anns, "no cert-manager annotation")
        named = [r for r in secret_rules if r.get("resourceNames")]
        check(len(named) == 1 and named[0]["resourceNames"] == [arg(a, "--webhook-secret-name")]
              and sorted(named[0]["verbs"]) == ["get", "update"], "Role: get/update on its own Secret only")
        check(all(set(r["verbs"]) <= {"create"} for r in secret_rules if not r.get("resourceNames")),
              "unnamed Secret rule is create only")
        sel = wh["namespaceSelector"]["matchExpressions"][0]
        check(sel["operator"] == "NotIn" and "kube-system" in sel["values"], "default selector skips kube-system")
    if variant == "cert-manager":
        check(arg(a, "--webhook-cert-mode") == "cert-manager", "cert mode cert-manager")
        cert = one(o, "Certificate")
        check(anns.get("cert-manager.io/inject-ca-from") == f"{cert['metadata']['namespace']}/{cert['metadata']['name']}",
              "CA-injection annotation names the Certificate")
        check(arg(a, "--webhook-cert-manager-certificate") == anns.get("cert-manager.io/inject-ca-from"),
              "operator flag names the same Certificate")
        check(cert["spec"]["secretName"] == arg(a, "--webhook-secret-name"), "Certificate writes the operator's Secret")
        check("Issuer" in o, "self-signed Issuer created")
        check(len(secret_rules) == 1 and secret_rules[0]["verbs"] == ["get"]
              and secret_rules[0]["resourceNames"] == [cert["spec"]["secretName"]], "Role: get on that Secret only")
    if variant == "cert-manager-issuer":
        cert = one(o, "Certificate")
        check(cert["spec"]["issuerRef"]["name"] == "corp-ca" and "Issuer" not in o, "given issuerRef used, no Issuer")
    if variant == "provided":
        check(arg(a, "--webhook-cert-mode") == "files" and arg(a, "--webhook-cert-dir") == "/tls", "cert mode files from /tls")
        vols = dep["spec"]["template"]["spec"]["volumes"]
        check(any(v.get("secret", {}).get("secretName") == "my-webhook-tls" for v in vols), "provided Secret mounted")
        check(secret_rules == [], "no Secret RBAC in provided mode")
    if variant == "servicemonitor":
        sm = one(o, "ServiceMonitor")
        check(sm["spec"]["endpoints"][0]["port"] == "metrics", "ServiceMonitor scrapes port metrics")
        check(sm["metadata"]["labels"].get("release") == "prom", "ServiceMonitor carries extra labels")
        check("PodMonitor" in o, "PodMonitor for the agents")
    else:
        check("ServiceMonitor" not in o, "no ServiceMonitor unless enabled")
    cm = [c for c in o["ConfigMap"] if c["metadata"]["name"] == dep["metadata"]["name"]][0]
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    check(set(cfg) <= {"priorities", "resourceNames", "cpuFallback", "unschedulableGracePeriod"},
          "operator config has only FileConfig keys")
    dpcm = one(o, "ConfigMap", "device-plugin")
    dpcfg = yaml.safe_load(dpcm["data"]["config.yaml"])
    check({t: v.get("resourceName") for t, v in dpcfg["vendors"].items()} == cfg["resourceNames"],
          "device plugin and operator use the same resource names")
    if variant == "priorities":
        check(cfg["priorities"] == {"gpu": 120, "rbln": 50, "furiosa": 100, "cpu": 0}, f"custom priorities: {cfg['priorities']}")
        check(cfg["cpuFallback"] is False and cfg["unschedulableGracePeriod"] == "90s", "cpuFallback and grace period")
        check(cfg["resourceNames"]["rbln"] == "rebellions.ai/npu", "custom rbln resource name")
        check(dpcfg["vendors"]["furiosa"]["enabled"] is False and dpcfg["vendors"]["gpu"]["enabled"] is True,
              "device plugin vendors subset")
    else:
        check(cfg["priorities"] == {"rbln": 100, "furiosa": 100, "gpu": 75, "cpu": 0} and cfg["cpuFallback"] is True,
              "default priorities rbln=furiosa=100, gpu=75, cpu=0, cpu fallback on")


def dockerfiles(root):
    ddir = os.path.join(root, "docker")
    cargo_bins = {}
    for crate in ("operator", "device-plugin", "agent"):
        toml = open(os.path.join(root, crate, "Cargo.toml")).read()
        pkg = re.search(r'^name = "([^"]+)"', toml, re.M).group(1)
        bins = re.findall(r'\[\[bin\]\]\s*name = "([^"]+)"', toml)
        cargo_bins[pkg] = bins
    ignore = open(os.path.join(root, ".dockerignore")).read().split()
    expected = {"operator": "rm-operator", "device-plugin": "rm-device-plugin", "agent": "rm-agent", "python-init": None}
    for comp, binary in expected.items():
        path = os.path.join(ddir, f"{comp}.Dockerfile")
        check(os.path.isfile(path), f"docker/{comp}.Dockerfile exists")
        if not os.path.isfile(path):
            continue
        text = open(path).read().replace("\\\n", " ")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
        check(len(froms) >= 2, f"{comp}: multi-stage ({len(froms)} FROM)")
        final = lines[lines.index(froms[-1]):]
        users = [ln.split()[1] for ln in final if ln.upper().startswith("USER ")]
        check(bool(users) and users[-1].split(":")[0] not in ("0", "root"), f"{comp}: final stage USER {users[-1] if users else None} is non-root")
        for ln in lines:
            if ln.upper().startswith("COPY ") and "--from=" not in ln:
                parts = [p for p in ln.split()[1:] if not p.startswith("--")]
                for src in parts[:-1]:
                    # dist/BIN: the prebuilt binary that e2e/images.sh puts in the context.
                    ok = src == "." or os.path.exists(os.path.join(root, src)) or src == f"dist/{binary}"
                    check(ok, f"{comp}: COPY source {src} exists")
                    check(not any(src.rstrip("/") == i.rstrip("/") for i in ignore), f"{comp}: {src} not excluded by .dockerignore")
        if binary:
            m = re.search(r"cargo build --release --locked -p (\S+)", text)
            check(m is not None and binary in cargo_bins.get(m.group(1), []),
                  f"{comp}: builds package {m.group(1) if m else None} with [[bin]] {binary}")
            check(f"target/release/{binary}" in text, f"{comp}: copies target/release/{binary}")
            ep = [ln for ln in final if ln.upper().startswith("ENTRYPOINT")]
            check(bool(ep) and f"/usr/local/bin/{binary}" in ep[-1], f"{comp}: ENTRYPOINT /usr/local/bin/{binary}")
            check("Cargo.lock" not in ignore and "target/" in ignore, f"{comp}: context keeps Cargo.lock, drops target/")
        else:
            check("/rm-abstract/rm_abstract" in text and "/rm-abstract/sitecustomize.py" in text,
                  "python-init: /rm-abstract/rm_abstract and /rm-abstract/sitecustomize.py")
            check(os.path.isfile(os.path.join(root, "python/rm_abstract/__init__.py")), "python/rm_abstract is a package")
            check(re.search(r"^ARG BUSYBOX_IMAGE=busybox:", text, re.M) is not None
                  and froms[-1].split()[1] == "${BUSYBOX_IMAGE}", "python-init: final image has cp (busybox)")
        # Bases are build arguments (e2e/images.sh passes local ones) whose
        # defaults are the public images.
        for ln in froms:
            base = ln.split()[1]
            m = re.fullmatch(r"\$\{(\w+)\}", base)
            if m and not base.startswith("${BINARIES"):
                default = re.search(rf"^ARG {m.group(1)}=(\S+)", text, re.M)
                check(default is not None and ("/" in default.group(1) or ":" in default.group(1)),
                      f"{comp}: base {base} defaults to a public image ({default.group(1) if default else None})")
    # The image paths the chart and the webhook rely on.
    inject = open(os.path.join(root, "operator/src/webhook/inject.rs")).read()
    check('"/rm-abstract"' in inject, "webhook copies /rm-abstract/. (same path as the init image)")


if __name__ == "__main__":
    if sys.argv[1] == "render":
        render(sys.argv[2], sys.stdin)
    elif sys.argv[1] == "dockerfiles":
        dockerfiles(sys.argv[2])
    if FAILED:
        print(f"  {len(FAILED)} check(s) failed")
        sys.exit(1)
