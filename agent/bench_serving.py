#!/usr/bin/env python3
"""Serving benchmark driver for agent/bench-serving.sh (stdlib only).

Drives concurrent streaming clients against the agent (unix socket,
POST /v1/generate with "stream": true and a text "prompt") and, when given,
llama.cpp's llama-server (TCP, POST /completion with "stream": true). Every
request asks for the same number of new tokens, greedy, EOS ignored, on the
same prompt texts. Prints aggregate tokens/s, TTFT p50/p99 and inter-token
p99 per server and concurrency, and the agent/reference ratios.

Both servers get the raw prompt text: no chat template is rendered (a
separate change adds chat-template rendering to the agent).
"""

import argparse
import http.client
import json
import socket
import sys
import threading
import time

PROMPTS = [
    "User: Write a short story about a lighthouse keeper who finds a message in a bottle.\nAssistant:",
    "User: Explain in simple words why the sky is blue.\nAssistant:",
    "User: Give me three ideas for a healthy breakfast and say why each is good.\nAssistant:",
    "User: What should I pack for a weekend hiking trip in the mountains?\nAssistant:",
]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def agent_request(args, prompt):
    conn = UnixHTTPConnection(args.agent_socket, args.request_timeout)
    body = json.dumps({
        "key": args.agent_key, "device": "cpu", "prompt": prompt,
        "max_new_tokens": args.new_tokens, "ignore_eos": True, "stream": True,
    })
    conn.request("POST", "/v1/generate", body, {"Content-Type": "application/json"})
    return conn


def agent_tokens(resp):
    """Yields once per streamed token; raises on an error event."""
    for line in resp:
        line = line.strip()
        if not line:
            continue
        ev = json.loads(line)
        if ev.get("event") == "token":
            yield
        elif ev.get("event") == "error":
            raise RuntimeError(ev.get("message"))


def llama_request(args, prompt):
    host, port = args.llama_url.split("//", 1)[-1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=args.request_timeout)
    body = json.dumps({
        "prompt": prompt, "n_predict": args.new_tokens, "stream": True,
        "ignore_eos": True, "temperature": 0, "top_k": 1, "cache_prompt": False,
    })
    conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
    return conn


def llama_tokens(resp):
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        ev = json.loads(line[5:])
        # One event per sampled token; an empty piece is still a token. The
        # last event (stop) carries the timings only.
        if not ev.get("stop"):
            yield


def one(args, kind, prompt, out):
    t0 = time.perf_counter()
    conn = (agent_request if kind == "agent" else llama_request)(args, prompt)
    resp = conn.getresponse()
    if resp.status != 200:
        out.append(("error", f"{resp.status} {resp.read()[:200]!r}"))
        return
    times = []
    it = agent_tokens(resp) if kind == "agent" else llama_tokens(resp)
    try:
        for _ in it:
            times.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        out.append(("error", str(e)))
        return
    conn.close()
    out.append(("ok", t0, times))


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


def level(args, kind, clients):
    rounds = max(1, args.requests // clients)
    results = []
    lock = threading.Lock()

    def client(i):
        for r in range(rounds):
            out = []
            one(args, kind, PROMPTS[(i + r) % len(PROMPTS)], out)
            with lock:
                results.extend(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    errors = [r[1] for r in results if r[0] == "error"]
    ok = [r for r in results if r[0] == "ok"]
    tokens = sum(len(r[2]) for r in ok)
    ttft = [r[2][0] - r[1] for r in ok if r[2]]
    gaps = [b - a for r in ok for a, b in zip(r[2], r[2][1:])]
    return {
        "requests": len(results), "errors": errors, "tokens": tokens,
        "tps": tokens / wall if wall > 0 else 0.0,
        "ttft50": pct(ttft, 50) * 1000, "ttft99": pct(ttft, 99) * 1000,
        "itl99": pct(gaps, 99) * 1000, "wall": wall,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent-socket", required=True)
    ap.add_argument("--agent-key", default="")
    ap.add_argument("--agent-gguf", default="", help="prepare this GGUF first (its key is used)")
    ap.add_argument("--llama-url", default="")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=8,
                    help="requests per level at least (each client sends requests/clients)")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--label", default="agent")
    args = ap.parse_args()
    if args.agent_gguf:
        conn = UnixHTTPConnection(args.agent_socket, args.request_timeout)
        conn.request("POST", "/v1/prepare", json.dumps(
            {"source": {"path": args.agent_gguf}, "device": "cpu"}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            sys.exit(f"prepare: {resp.status} {body[:300]!r}")
        args.agent_key = json.loads(body)["key"]

    servers = [("agent", args.label)]
    if args.llama_url:
        servers.insert(0, ("llama", "llama-server"))
    table = {}
    for kind, _ in servers:
        # Model load and first-touch warm-up stay out of the figures.
        out = []
        one(args, kind, PROMPTS[0], out)
        if out and out[0][0] == "error":
            sys.exit(f"{kind}: warm-up request failed: {out[0][1]}")
    for c in [int(x) for x in args.concurrency.split(",")]:
        for kind, name in servers:
            r = level(args, kind, c)
            table[(name, c)] = r
            err = f"  errors: {len(r['errors'])} ({r['errors'][0]})" if r["errors"] else ""
            print(f"  {name:>13} c={c:<3} {r['requests']:>3} req {r['tokens']:>5} tok "
                  f"in {r['wall']:6.1f} s{err}", file=sys.stderr, flush=True)

    print("\nBoth servers get the raw prompt text (no chat template; a separate change adds")
    print(f"chat-template rendering). {args.new_tokens} new tokens per request, greedy, EOS ignored, streaming.\n")
    print(f"| server | clients | tokens/s | TTFT p50 ms | TTFT p99 ms | inter-token p99 ms |")
    print(f"|---|---:|---:|---:|---:|---:|")
    cs = [int(x) for x in args.concurrency.split(",")]
    for _, name in servers:
        for c in cs:
            r = table[(name, c)]
            print(f"| {name} | {c} | {r['tps']:.1f} | {r['ttft50']:.0f} | {r['ttft99']:.0f} | {r['itl99']:.0f} |")
    if args.llama_url:
        print("\n| clients | throughput agent/llama-server (goal >= 0.9) | TTFT p99 agent/llama-server (goal <= 1.2) |")
        print("|---:|---:|---:|")
        for c in cs:
            a, l = table[(args.label, c)], table[("llama-server", c)]
            tp = a["tps"] / l["tps"] if l["tps"] else float("nan")
            tt = a["ttft99"] / l["ttft99"] if l["ttft99"] else float("nan")
            print(f"| {c} | {tp:.2f} | {tt:.2f} |")


if __name__ == "__main__":
    main()
