"""What this node has and whether rm_abstract works on it, answered by the
node agent (GET /v1/system, /v1/backends), not guessed from the pod: the
pod sees neither the node's accelerators nor their SDKs.

The original library's get_system_info(), print_system_info(),
get_quick_status(), validate_system(), print_validation_report() and
get_working_components(), with their shapes where they make sense here.
"""
from __future__ import annotations

import platform
import time

from .exceptions import AgentError


class SystemInfo:
    """The node as the agent reports it. `to_dict()` has the original's
    three parts: hardware (gpus, npus, cpu), software (backends) and
    system (the node's OS, and the pod's Python)."""

    def __init__(self, answer, error=None):
        answer = answer or {}
        self.raw = answer
        self.error = error
        node = answer.get("node") or {}
        devices = answer.get("devices") or []
        self.cpu = next((d for d in devices if d.get("device_type") == "cpu"), None)
        self.gpus = [d for d in devices if d.get("device_type") == "gpu"]
        self.npus = [d for d in devices if d.get("device_type") in ("rbln", "furiosa")]
        self.backends = answer.get("backends") or []
        self.node = node
        self.agent_version = (answer.get("agent") or {}).get("version")
        self.os_name = node.get("os")
        self.os_version = node.get("kernel")
        self.python_version = platform.python_version()

    def to_dict(self):
        return {
            "hardware": {"gpus": self.gpus, "npus": self.npus, "cpu": self.cpu},
            "software": {"backends": self.backends, "agent_version": self.agent_version},
            "system": {"hostname": self.node.get("hostname"), "os_name": self.os_name,
                       "os_version": self.os_version, "arch": self.node.get("arch"),
                       "cpu_count": self.node.get("cpu_count"),
                       "memory_total_bytes": self.node.get("memory_total_bytes"),
                       "memory_available_bytes": self.node.get("memory_available_bytes"),
                       "python_version": self.python_version},
            "error": self.error,
        }


def get_system_info(client=None):
    """The node's hardware and backends; never raises for a missing agent
    (`.error` says why, the rest is empty)."""
    from . import _any_client
    client = client or _any_client()
    try:
        return SystemInfo(client.request("GET", "/v1/system"))
    except AgentError as e:
        return SystemInfo(None, error=e.agent_message)


def _gib(n):
    return "%.1f GiB" % (n / 2**30) if isinstance(n, (int, float)) else "?"


def print_system_info(info=None):
    info = info or get_system_info()
    d = info.to_dict()
    print("RM Abstract Layer - system (as the node agent sees it)")
    if info.error:
        print("  agent: not reachable: %s" % info.error)
        return
    s = d["system"]
    print("  node: %s, %s %s, %s, %s CPUs, memory %s (%s available), agent %s"
          % (s["hostname"], s["os_name"], s["os_version"], s["arch"], s["cpu_count"],
             _gib(s["memory_total_bytes"]), _gib(s["memory_available_bytes"]), d["software"]["agent_version"]))
    for dev in [info.cpu] + info.gpus + info.npus:
        if dev:
            print("  device %s:%s  %s (%s)%s" % (dev.get("device_type"), dev.get("device_id"), dev.get("name"),
                                               dev.get("vendor"),
                                               ", memory %s" % _gib(dev["memory_total_bytes"])
                                               if dev.get("memory_total_bytes") else ""))
    for b in info.backends:
        print("  backend %-16s %s%s" % (b.get("name"), "available" if b.get("available") else "unavailable",
                                        "" if b.get("available") else " (%s)" % b.get("reason")))


def get_quick_status(info=None):
    info = info or get_system_info()
    names = {b.get("name"): bool(b.get("available")) for b in info.backends}
    return {"agent_reachable": info.error is None, "gpu_available": bool(info.gpus),
            "npu_available": bool(info.npus),
            **{"%s_backend" % n.replace("-", "_"): ok for n, ok in names.items()}}


# -- validation: real calls, not package checks --------------------------------------

PASS, FAIL, SKIP = "pass", "fail", "skip"


class TestResult:
    __test__ = False  # not a pytest class

    def __init__(self, name, status, message, duration_ms):
        self.name, self.status, self.message, self.duration_ms = name, status, message, duration_ms

    def __repr__(self):
        return "TestResult(%r, %s, %r)" % (self.name, self.status, self.message)


class ValidationReport:
    def __init__(self, results):
        self.results = results

    @property
    def passed(self):
        return all(r.status != FAIL for r in self.results)

    def to_dict(self):
        return {"passed": self.passed, "results": [vars(r) for r in self.results]}


def validate_system(run_inference_tests=True, verbose=False, model=None):
    """Checks, against the node agent, what a script here relies on: the
    agent answers, it accepts this pod's identity, a backend serves the
    configured device, and (with `model=`, a local model directory and
    `run_inference_tests`) a real load and generate through it."""
    from . import _any_client, _settings
    cfg = _settings()
    client = _any_client()
    results = []

    def check(name, fn):
        start = time.monotonic()
        try:
            status, msg = fn()
        except AgentError as e:
            status, msg = FAIL, e.agent_message
        except Exception as e:  # noqa: BLE001 - a report, not a crash
            status, msg = FAIL, "%s: %s" % (type(e).__name__, e)
        results.append(TestResult(name, status, msg, (time.monotonic() - start) * 1000))
        if verbose:
            print("[%s] %s: %s" % (status.upper(), name, msg))
        return status == PASS

    ok = check("agent reachable", lambda: (PASS, "rm-agent %s at %s" % (
        (client.health() or {}).get("version", "?"), client.socket_path)))
    backends = []

    def identity():
        backends.extend(client.backends())
        return PASS, "the agent accepts this pod's token" if client.token else "no token sent (workstation agent)"
    ok = ok and check("identity", identity)

    kind = cfg.device.split(":")[0]

    def backend():
        if kind in ("auto", "npu"):
            fits = [b for b in backends if b.get("available")]
        else:
            fits = [b for b in backends if b.get("available") and kind in b.get("device_types", [])]
        if not fits:
            why = "; ".join("%s: %s" % (b["name"], b.get("reason")) for b in backends
                            if kind in b.get("device_types", []) or kind in ("auto", "npu"))
            return FAIL, "no available backend for %s%s" % (kind, " (%s)" % why if why else "")
        return PASS, ", ".join(b["name"] for b in fits)
    ok = ok and check("backend for %s" % cfg.device, backend)

    if not (run_inference_tests and ok):
        pass
    elif model is None:
        results.append(TestResult("inference", SKIP, "pass model= (a local model directory) to run one", 0.0))
    else:
        def inference():
            from .model import _load
            m = _load(cfg, model, {})
            out = m.generate([[1]], max_new_tokens=1, do_sample=False)
            return PASS, "%s generated %d token on %s via %s" % (model, len(out[0]) - 1, cfg.device, m.rm_backend)
        check("inference", inference)
    return ValidationReport(results)


def print_validation_report(report=None, run_inference_tests=True):
    report = report or validate_system(run_inference_tests=run_inference_tests)
    print("RM Abstract Layer - system validation (through the node agent)")
    for r in report.results:
        print("  [%s] %-24s %s (%.0f ms)" % (r.status.upper(), r.name, r.message, r.duration_ms))
    print("  %s" % ("all checks passed" if report.passed else "some checks failed"))


def get_working_components():
    return {r.name: r.status == PASS for r in validate_system(run_inference_tests=False).results}
