#!/usr/bin/env python3
"""TEST DOUBLE of an accelerator worker, for rm-agent's tests only.

It speaks the rm-agent worker protocol (JSON lines on stdin/stdout) exactly
like the real workers in agent/workers/, but runs no model: "compile" writes a
small artifact, "generate" answers deterministic tokens, "forward" deterministic logits
(vocabulary 4: row j of a sequence is ids[j] + k for k in 0..3). Special inputs make
it misbehave on purpose so the tests can check supervision:

- compile option extra["test.compile_seconds"]: sleep that long while
  compiling (after writing a partial file);
- compile option extra["test.fail"] = "1": answer an error;
- compile option extra["trust_remote_code"]: ignored (no code is run); the
  artifact records RM_ALLOW_TRUST_REMOTE_CODE as the agent set it;
- prompt text "crash": exit at once (status 3);
- prompt text "garbage": print a line that is not JSON;
- prompt text "hang": never answer (and ignore `cancel`); logs "hang <pid>"
  with TEST_DOUBLE_EVENTS when it starts hanging;
- prompt text "slow": 600 tokens, one every 100 ms (a minute), streamed or
  not; it honours `cancel` at its next token, answering kind "cancelled";
- prompt text "pid": answer this process's pid as the text (the compile's
  artifact.json records the compiling process's pid too), so tests can tell
  processes apart;
- env TEST_DOUBLE_EVENTS=<file>: append "start <pid> <RM_DEVICES>" when the
  process starts and "exit <pid>" when it is told to shut down, so tests can
  see the order in which processes come and go; "token <pid> ..." for each
  token of a "slow" prompt and "cancelled <pid> ..." when one stops, so tests
  can see work stop.

Like rm_worker.serve() (which it does not use, to stay a stand-alone
program), it reads stdin on a thread, so that `cancel` arrives while a
request runs, and says so in its hello ("cancel": true).
"""
import array
import base64
import json
import os
import queue
import sys
import threading
import time

PARENT = os.getppid()


def event(what):
    path = os.environ.get("TEST_DOUBLE_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write("%s %d %s\n" % (what, os.getpid(), os.environ.get("RM_DEVICES", "")))


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# Ids of the requests the agent cancelled (written by the reader thread).
CANCELLED = set()
LOCK = threading.Lock()


def is_cancelled(rid):
    with LOCK:
        return rid in CANCELLED


def parent_alive():
    return os.getppid() == PARENT


def compile_(rid, p):
    extra = (p.get("options") or {}).get("extra") or {}
    out = p["output_dir"]
    with open(os.path.join(out, "partial.bin"), "wb") as f:
        f.write(b"\0" * 4096)
    delay = float(extra.get("test.compile_seconds", "0"))
    end = time.time() + delay
    while time.time() < end:
        if not parent_alive():
            sys.exit(0)
        send({"id": rid, "progress": {"fraction": 1 - max(0.0, end - time.time()) / max(delay, 1e-9), "stage": "test-compile"}})
        time.sleep(0.05)
    if extra.get("test.fail") == "1":
        send({"id": rid, "error": {"kind": "unsupported", "message": "test double asked to fail"}})
        return
    with open(os.path.join(out, "artifact.json"), "w") as f:
        json.dump({"test_double": True, "pid": os.getpid(), "devices": p.get("devices"), "env_devices": os.environ.get("RM_DEVICES"),
                   "extra": extra, "env_allow_trust_remote_code": os.environ.get("RM_ALLOW_TRUST_REMOTE_CODE")}, f)
    send({"id": rid, "result": {}})


def generate(rid, p):
    outputs = []
    for i, prompt in enumerate(p["prompts"]):
        if prompt == "crash":
            os._exit(3)
        if prompt == "garbage":
            sys.stdout.write("this is not json\n")
            sys.stdout.flush()
            return
        if prompt == "pid":
            outputs.append({"prompt_tokens": 3, "token_ids": [], "text": str(os.getpid()), "finish_reason": "length"})
            continue
        if prompt == "hang":
            event("hang")
            while parent_alive():
                time.sleep(0.1)
            sys.exit(0)
        if prompt == "slow":
            toks = []
            for k in range(600):
                if not parent_alive():
                    sys.exit(0)
                if is_cancelled(rid):
                    event("cancelled")
                    send({"id": rid, "error": {"kind": "cancelled", "message": "test double: cancelled after %d tokens" % k}})
                    return
                time.sleep(0.1)
                t = k % 1000
                toks.append(t)
                event("token")
                if p.get("stream"):
                    send({"id": rid, "token": {"index": i, "token_id": t}})
            outputs.append({"prompt_tokens": 4, "token_ids": toks, "text": "slow", "finish_reason": "length"})
            continue
        ids = prompt if isinstance(prompt, list) else [ord(c) for c in prompt]
        n = p["params"]["max_new_tokens"]
        toks = [(ids[-1] + k + 1) % 1000 for k in range(n)] if ids else []
        if p.get("stream"):
            for t in toks:
                send({"id": rid, "token": {"index": i, "token_id": t}})
        outputs.append({
            "prompt_tokens": len(ids),
            "token_ids": toks,
            "text": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "finish_reason": "length",
        })
    send({"id": rid, "result": {"outputs": outputs}})


def forward(rid, p):
    outputs = []
    keep = p.get("logits_to_keep") or 0
    for ids in p["input_ids"]:
        rows = ids[-keep:] if keep else ids
        values = array.array("f", [float(t + k) for t in rows for k in range(4)])
        if sys.byteorder != "little":
            values.byteswap()
        outputs.append({"positions": len(rows), "vocab_size": 4,
                        "logits": base64.b64encode(values.tobytes()).decode("ascii")})
    send({"id": rid, "result": {"outputs": outputs}})


def read(inbox):
    """Requests go to `inbox` in order; `cancel` is applied at once. The
    end of stdin (or a line it cannot read) ends the main loop too."""
    try:
        for line in sys.stdin:
            msg = json.loads(line)
            if msg["method"] == "cancel":
                with LOCK:
                    CANCELLED.add(msg["params"]["id"])
                continue
            inbox.put(msg)
    finally:
        inbox.put(None)


def main():
    event("start")
    inbox = queue.Queue()
    threading.Thread(target=read, args=(inbox,), daemon=True).start()
    while True:
        msg = inbox.get()
        if msg is None:
            return
        rid, method, params = msg["id"], msg["method"], msg.get("params") or {}
        if method == "hello":
            send({"id": rid, "result": {"protocol": 1, "compiler_version": "test-double-1", "available": True, "cancel": True}})
        elif method == "compile":
            compile_(rid, params)
        elif method == "generate":
            generate(rid, params)
        elif method == "forward":
            forward(rid, params)
        elif method == "cleanup":
            send({"id": rid, "result": {}})
        elif method == "shutdown":
            event("exit")
            return
        else:
            send({"id": rid, "error": {"kind": "invalid_request", "message": "unknown method " + method}})


if __name__ == "__main__":
    main()
