"""The rm-agent worker protocol (version 1), shared by the shipped workers.

JSON lines over stdin/stdout; logs go to stderr. See agent/README.md.
A worker subclasses `Worker` and calls `serve(MyWorker())`.
"""
import json
import os
import shutil
import sys
import traceback

PROTOCOL = 1


class WorkerError(Exception):
    """An error answered to the agent; kind is invalid_request, unsupported,
    unavailable or internal."""

    def __init__(self, message, kind="internal"):
        super().__init__(message)
        self.kind = kind


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def devices():
    """Host device ids of this process's allocation (RM_DEVICES)."""
    raw = os.environ.get("RM_DEVICES", "")
    return [d for d in raw.split(",") if d]


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


def serve(worker):
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except ValueError:
            log("rm-worker: ignoring a line that is not JSON")
            continue
        rid = msg.get("id", 0)
        method = msg.get("method")
        params = msg.get("params") or {}
        try:
            if method == "hello":
                ok, reason = worker.probe()
                send({"id": rid, "result": {"protocol": PROTOCOL, "compiler_version": worker.compiler_version,
                                             "available": bool(ok), "reason": reason}})
            elif method == "compile":
                def progress(fraction, stage):
                    send({"id": rid, "progress": {"fraction": float(fraction), "stage": stage}})
                worker.compile(params, progress)
                send({"id": rid, "result": {}})
            elif method == "generate":
                def emit(index, token_id, text=None):
                    send({"id": rid, "token": {"index": index, "token_id": int(token_id), "text": text}})
                outputs = worker.generate(params, emit)
                send({"id": rid, "result": {"outputs": outputs}})
            elif method == "forward":
                send({"id": rid, "result": {"outputs": worker.forward(params)}})
            elif method == "cleanup":
                worker.cleanup(params.get("key"))
                send({"id": rid, "result": {}})
            elif method == "shutdown":
                return
            else:
                raise WorkerError("unknown method %r" % method, "invalid_request")
        except WorkerError as e:
            send({"id": rid, "error": {"kind": e.kind, "message": str(e)}})
        except Exception as e:  # noqa: BLE001 - every failure is answered, never fatal
            log(traceback.format_exc())
            send({"id": rid, "error": {"kind": "internal", "message": "%s: %s" % (type(e).__name__, e)}})


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
