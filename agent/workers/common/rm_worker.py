"""The rm-agent worker protocol (version 1), shared by the shipped workers.

JSON lines over stdin/stdout; logs go to stderr. See agent/README.md.
A worker subclasses `Worker` and calls `serve(MyWorker())`.

Cancellation: stdin is read on a thread of its own, so the agent's
`cancel` message arrives while a request runs. Worker code sees it through
the token callback (`emit` raises `Cancelled` once the request is
cancelled) and through `cancelled()` / `raise_if_cancelled()` (also
attributes of `emit` and `progress`) for loops that emit nothing. The
request is then answered with an error of kind "cancelled".
"""
import json
import math
import os
import queue
import re
import shutil
import sys
import threading
import traceback
import unicodedata

PROTOCOL = 1


class WorkerError(Exception):
    """An error answered to the agent; kind is invalid_request, unsupported,
    unavailable or internal."""

    def __init__(self, message, kind="internal"):
        super().__init__(message)
        self.kind = kind


class Cancelled(WorkerError):
    """Raised in worker code once the agent cancelled the request being
    served (its client went away or its time is up). A WorkerError, so that
    worker code that catches and re-raises those passes it on; serve()
    answers kind "cancelled" for a cancelled request whatever the worker
    code did with it."""

    def __init__(self, message="cancelled by the agent (the request's client went away or its time is up)"):
        super().__init__(message, "cancelled")


class _Requests:
    """Ids received and not yet answered, and which of them the agent
    cancelled. Shared by the reader thread and the serving (main) thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pending = set()
        self.cancelled = set()
        self.current = None

    def received(self, rid):
        with self.lock:
            self.pending.add(rid)

    def cancel(self, rid):
        # Only requests not yet answered: a cancel that crossed its
        # request's answer on the way would otherwise stay in the set.
        with self.lock:
            if rid in self.pending:
                self.cancelled.add(rid)

    def is_cancelled(self, rid):
        with self.lock:
            return rid in self.cancelled

    def answered(self, rid):
        with self.lock:
            self.pending.discard(rid)
            self.cancelled.discard(rid)


_requests = _Requests()


def cancelled():
    """True once the agent cancelled the request being served now."""
    rid = _requests.current
    return rid is not None and _requests.is_cancelled(rid)


def raise_if_cancelled():
    """Raises Cancelled once the request being served now was cancelled:
    for loops between steps (prompts, chunks) that emit no tokens."""
    if cancelled():
        raise Cancelled()


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def devices():
    """Host device ids of this process's allocation (RM_DEVICES)."""
    raw = os.environ.get("RM_DEVICES", "")
    return [d for d in raw.split(",") if d]


TRUST_REMOTE_CODE = "trust_remote_code"
_INT = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")
_manifests = {}


def _extra_options(worker_dir):
    """The `extra_options` declarations of <worker_dir>/manifest.json (cached)."""
    if worker_dir not in _manifests:
        with open(os.path.join(worker_dir, "manifest.json")) as f:
            _manifests[worker_dir] = json.load(f).get("extra_options") or {}
    return _manifests[worker_dir]


def typed_extras(extra, worker_dir, reserved=()):
    """Converts `options.extra` (strings) to Python values by the types the
    worker's manifest declares under "extra_options", for passing to the SDK.

    The agent has already checked them (agent/src/backend/extra.rs); this is
    the same check again, so that nothing unchecked reaches the SDK even if
    the agent is bypassed or a manifest and a worker disagree: a key the
    manifest does not declare, a value that does not parse as its type or
    lies outside its range, and `trust_remote_code` unless the agent was
    started with --allow-trust-remote-code (it tells workers so in
    RM_ALLOW_TRUST_REMOTE_CODE=1) raise WorkerError("invalid_request"), as
    does a key in `reserved` (the SDK arguments the worker sets itself).
    Returns {key: int | float | bool | str}.
    """
    decls = _extra_options(worker_dir)
    trust_allowed = os.environ.get("RM_ALLOW_TRUST_REMOTE_CODE") == "1"
    allowed = ", ".join(sorted(k for k in decls if k != TRUST_REMOTE_CODE or trust_allowed)) or "none"
    out = {}
    for key, raw in sorted((extra or {}).items()):
        decl = decls.get(key)
        if key in reserved:
            raise WorkerError("options.extra key %r is set by the worker from the agent's options; allowed keys: %s"
                              % (key, allowed), "invalid_request")
        if decl is None:
            raise WorkerError("options.extra key %r is not an option of this worker; allowed keys: %s"
                              % (key, allowed), "invalid_request")
        if key == TRUST_REMOTE_CODE and not trust_allowed:
            raise WorkerError("options.extra key 'trust_remote_code' is refused: it runs the model repository's "
                              "Python code on the node, and the agent was not started with "
                              "--allow-trust-remote-code", "invalid_request")
        out[key] = _typed_value(key, raw, decl)
    return out


def _typed_value(key, raw, decl):
    def bad(why):
        return WorkerError("options.extra key %r: the value %r %s" % (key, raw, why), "invalid_request")

    if not isinstance(raw, str):
        raise bad("is not a string (the agent sends every extra as a string)")
    kind = decl.get("type")
    if kind in ("int", "float"):
        if kind == "int":
            if not _INT.fullmatch(raw):
                raise bad("is not an integer")
            v = int(raw)
            if not -2 ** 63 <= v < 2 ** 63:
                raise bad("is not an integer of 64 bits")
        else:
            if not _FLOAT.fullmatch(raw) or not math.isfinite(float(raw)):
                raise bad("is not a finite decimal number")
            v = float(raw)
        if decl.get("min") is not None and v < decl["min"]:
            raise bad("is below the minimum %s" % decl["min"])
        if decl.get("max") is not None and v > decl["max"]:
            raise bad("is above the maximum %s" % decl["max"])
        return v
    if kind == "bool":
        if raw not in ("true", "false"):
            raise bad("is not true or false")
        return raw == "true"
    if kind == "enum":
        if raw not in decl.get("values", []):
            raise bad("is not one of %s" % ", ".join(decl.get("values", [])))
        return raw
    if kind == "string":
        limit = decl.get("max_len") or 256
        if len(raw) > limit or any(unicodedata.category(c) == "Cc" for c in raw):
            raise bad("is longer than %d characters or holds control characters" % limit)
        return raw
    raise WorkerError("manifest.json declares extra option %r with unknown type %r" % (key, kind), "internal")


def copy_model_files(src, dst, suffixes=(".json", ".safetensors", ".model", ".txt", ".tiktoken")):
    """Copies a HF model directory's usable files into the artifact dir."""
    for name in sorted(os.listdir(src)):
        if name.startswith("."):
            continue
        p = os.path.join(src, name)
        if os.path.isfile(p) and name.endswith(suffixes):
            shutil.copyfile(p, os.path.join(dst, name))


class Worker:
    compiler_version = "unknown"

    def probe(self):
        """Returns (available, reason)."""
        return True, None

    def compile(self, params, progress):
        raise WorkerError("compile is not implemented", "unsupported")

    def generate(self, params, emit_token):
        raise WorkerError("generate is not implemented", "unsupported")

    def forward(self, params):
        """Logits per sequence: [{"positions", "vocab_size", "logits": f32le_base64(...)}].
        Optional: a device SDK that only generates answers 'unsupported' (422)."""
        raise WorkerError("this backend does not return logits; use generate", "unsupported")

    def cleanup(self, key):
        pass


def kept_rows(n, logits_to_keep):
    """transformers' logits_to_keep: 0 keeps all n positions, k the last k."""
    return n if not logits_to_keep else min(int(logits_to_keep), n)


def f32le_base64(values):
    """Floats as base64 of little-endian float32, the protocol's logits encoding."""
    import array
    import base64
    a = array.array("f", values)
    if sys.byteorder != "little":
        a.byteswap()
    return base64.b64encode(a.tobytes()).decode("ascii")


def _read_requests(requests, out):
    """The reader thread: requests go to `out` in order (None at the end of
    stdin); `cancel` messages are applied at once, while a request runs."""
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except ValueError:
            log("rm-worker: ignoring a line that is not JSON")
            continue
        if not isinstance(msg, dict):
            log("rm-worker: ignoring a line that is not a JSON object")
            continue
        if msg.get("method") == "cancel":
            # No answer: the cancelled request's own answer says it stopped.
            requests.cancel((msg.get("params") or {}).get("id"))
            continue
        requests.received(msg.get("id", 0))
        out.put(msg)
        if msg.get("method") == "shutdown":
            break
    out.put(None)


def serve(worker):
    inbox = queue.Queue()
    threading.Thread(target=_read_requests, args=(_requests, inbox), daemon=True).start()
    while True:
        msg = inbox.get()
        if msg is None:
            return
        rid = msg.get("id", 0)
        method = msg.get("method")
        params = msg.get("params") or {}
        if method == "shutdown":
            return
        _requests.current = rid
        try:
            _answer(worker, rid, method, params)
        finally:
            _requests.current = None
            _requests.answered(rid)


def _answer(worker, rid, method, params):
    """Runs one request and sends its one final answer."""
    try:
        # Cancelled while it waited behind another request: not started.
        raise_if_cancelled()
        if method == "hello":
            ok, reason = worker.probe()
            result = {"protocol": PROTOCOL, "compiler_version": worker.compiler_version,
                      "available": bool(ok), "reason": reason, "cancel": True}
        elif method == "compile":
            def progress(fraction, stage):
                send({"id": rid, "progress": {"fraction": float(fraction), "stage": stage}})
            progress.cancelled = cancelled
            progress.raise_if_cancelled = raise_if_cancelled
            worker.compile(params, progress)
            result = {}
        elif method == "generate":
            def emit(index, token_id, text=None):
                # Stops a token loop at its next token; the token is not sent.
                raise_if_cancelled()
                send({"id": rid, "token": {"index": index, "token_id": int(token_id), "text": text}})
            emit.cancelled = cancelled
            emit.raise_if_cancelled = raise_if_cancelled
            result = {"outputs": worker.generate(params, emit)}
        elif method == "forward":
            result = {"outputs": worker.forward(params)}
        elif method == "cleanup":
            worker.cleanup(params.get("key"))
            result = {}
        else:
            raise WorkerError("unknown method %r" % method, "invalid_request")
        answer = {"id": rid, "result": result}
    except WorkerError as e:
        answer = {"id": rid, "error": {"kind": e.kind, "message": str(e)}}
    except Exception as e:  # noqa: BLE001 - every failure is answered, never fatal
        log(traceback.format_exc())
        answer = {"id": rid, "error": {"kind": "internal", "message": "%s: %s" % (type(e).__name__, e)}}
    if _requests.is_cancelled(rid) and "result" not in answer:
        # Whatever the worker code made of the Cancelled it got (an SDK may
        # wrap exceptions from callbacks), the agent is told it stopped.
        answer = {"id": rid, "error": {"kind": "cancelled", "message": str(Cancelled())}}
    send(answer)


def repetition_penalty(p):
    """The generation params' `repetition_penalty` (transformers' meaning;
    1.0, or absent, is off), checked."""
    v = p.get("repetition_penalty")
    if v is None:
        return 1.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise WorkerError("repetition_penalty must be a number above 0 (1.0 is off), not %r" % (v,),
                          "invalid_request")
    return float(v)


def min_new_tokens(p):
    """The generation params' `min_new_tokens` (absent: 0, off), checked."""
    v = p.get("min_new_tokens")
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise WorkerError("min_new_tokens must be a whole number of at least 0, not %r" % (v,), "invalid_request")
    return v


def finish_reason(tokens, eos_ids, max_new):
    if tokens and tokens[-1] in eos_ids:
        return "eos"
    return "length"


def write_artifact_manifest(out_dir, **fields):
    with open(os.path.join(out_dir, "artifact.json"), "w") as f:
        json.dump(fields, f, indent=2)


def read_artifact_manifest(artifact_dir):
    with open(os.path.join(artifact_dir, "artifact.json")) as f:
        return json.load(f)
