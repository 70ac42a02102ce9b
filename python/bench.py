#!/usr/bin/env python3
"""Measures what rm_abstract costs:

1. interpreter start-up with our sitecustomize on PYTHONPATH, not acting
   (RM_INJECTED unset) and acting (RM_INJECTED=1: init() from the env),
   against a plain `python -c pass`; interleaved runs, medians;
2. per-generate overhead of the proxy (tensor conversion, kwargs, the HTTP
   client) over a bare HTTP request to the agent with the same body,
   interleaved pairs, median of the differences; the same for forward()
   (logits of every prompt position), whose answer the proxy also decodes.

Usage: python3 bench.py [--agent-socket PATH] [--model DIR] [--runs N]
Without --agent-socket it starts target/debug/rm-agent (RM_AGENT_BIN picks
another); without --model it writes a tiny random llama (needs the test
requirements: numpy, safetensors, tokenizers, transformers).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def startup(runs):
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
    cases = {
        "plain python (no PYTHONPATH)": dict(base),
        "sitecustomize, not acting": dict(base, PYTHONPATH=str(HERE)),
        "sitecustomize, acting (init from env)": dict(base, PYTHONPATH=str(HERE), RM_INJECTED="1", RM_DEVICE="cpu"),
    }
    times = {k: [] for k in cases}
    for _ in range(runs):
        for k, env in cases.items():  # interleaved: load changes hit every case
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
            times[k].append((time.perf_counter() - t) * 1000)
    base_ms = statistics.median(times["plain python (no PYTHONPATH)"])
    print("start-up (%s, %d runs each, median):" % (sys.executable, runs))
    for k, v in times.items():
        m = statistics.median(v)
        print("  %-40s %7.2f ms  (+%.2f ms)" % (k, m, m - base_ms))
    # The sitecustomize's own import time (python -X importtime), which the
    # noise of whole-process start-up on a loaded machine can hide.
    for k in ("sitecustomize, not acting", "sitecustomize, acting (init from env)"):
        vals = []
        for _ in range(runs):
            err = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], env=cases[k],
                                 capture_output=True, text=True, check=True).stderr
            line = [l for l in err.splitlines() if l.split("|")[-1].strip() == "sitecustomize"]
            vals.append(int(line[-1].split("|")[1]) / 1000 if line else 0.0)
        print("  %-40s %7.2f ms  (its import, -X importtime)" % (k, statistics.median(vals)))
    # in-process import cost, a steadier figure than process start-up
    code = ("import time,sys; t=time.perf_counter(); import rm_abstract; rm_abstract.init(device='cpu', verbose=False); "
            "print((time.perf_counter()-t)*1e3)")
    vals = [float(subprocess.run([sys.executable, "-c", code], env=dict(base, PYTHONPATH=str(HERE)), capture_output=True,
                                 text=True, check=True).stdout) for _ in range(runs)]
    print("  %-40s %7.2f ms" % ("import rm_abstract + init() in-process", statistics.median(vals)))


def overhead(socket_path, model_dir, runs, new_tokens):
    sys.path.insert(0, str(HERE))
    import numpy as np
    import rm_abstract
    from rm_abstract.client import AgentClient

    rm_abstract.init(device="cpu", agent_socket=socket_path, verbose=False)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    raw = AgentClient(socket_path)
    prompt = [[5, 6, 7, 8, 9, 10, 11, 12]]
    body = {"key": model.rm_key, "device": "cpu", "input_ids": prompt, "max_new_tokens": new_tokens,
            "do_sample": False}
    eos = getattr(model.generation_config, "eos_token_id", None)  # a GGUF directory has no generation_config
    if eos is not None:
        body["eos_token_id"] = [eos]
    ids, mask = np.array(prompt), np.ones((1, 8), dtype=np.int64)
    for _ in range(3):  # warm: first generate re-verifies the entry's files
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens)
    direct, proxy = [], []
    for _ in range(runs):
        t = time.perf_counter()
        raw.request("POST", "/v1/generate", body)
        direct.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens)
        proxy.append((time.perf_counter() - t) * 1000)
    diffs = [p - d for p, d in zip(proxy, direct)]
    print("generate, %d new tokens, %d interleaved pairs (median):" % (new_tokens, runs))
    print("  agent API directly (one HTTP request)  %7.3f ms" % statistics.median(direct))
    print("  proxy model.generate(numpy in/out)     %7.3f ms" % statistics.median(proxy))
    print("  overhead per call                      %7.3f ms" % statistics.median(diffs))

    # forward: the same prompt's logits at every position
    import base64
    fbody = {"key": model.rm_key, "device": "cpu", "input_ids": prompt}
    model(ids)  # warm
    direct, decoded, proxy = [], [], []
    for _ in range(runs):
        t = time.perf_counter()
        r = raw.request("POST", "/v1/forward", fbody)
        direct.append((time.perf_counter() - t) * 1000)
        o = r["outputs"][0]
        np.frombuffer(base64.b64decode(o["logits"]), "<f4").reshape(o["positions"], o["vocab_size"])
        decoded.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        model(ids, attention_mask=mask).logits
        proxy.append((time.perf_counter() - t) * 1000)
    vocab = o["vocab_size"]
    print("forward, %d positions x %d vocabulary, %d interleaved pairs (median):" % (len(prompt[0]), vocab, runs))
    print("  agent API directly (one HTTP request)  %7.3f ms" % statistics.median(direct))
    print("  ... plus numpy decode of the logits    %7.3f ms" % statistics.median(decoded))
    print("  proxy model(ids).logits (numpy)        %7.3f ms" % statistics.median(proxy))
    print("  overhead per call (vs request alone)   %7.3f ms" % statistics.median([p - d for p, d in zip(proxy, direct)]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent-socket")
    ap.add_argument("--model")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=1)
    a = ap.parse_args()
    startup(a.runs)
    agent = None
    if not a.agent_socket:
        sys.path.insert(0, str(HERE / "tests"))
        from conftest import Agent, _agent_binary, make_tiny_llama
        tmp = Path(tempfile.mkdtemp(prefix="rmbench-"))
        agent = Agent(_agent_binary(), tmp)
        a.agent_socket = str(agent.socket)
        a.model = a.model or str(make_tiny_llama(tmp / "tiny"))
    try:
        overhead(a.agent_socket, a.model, a.runs * 3, a.new_tokens)
    finally:
        if agent:
            agent.stop()


if __name__ == "__main__":
    main()
