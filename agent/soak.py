#!/usr/bin/env python3
"""Soak test of rm-agent (issue 17): many tenants at once, one hostile.

Starts the real agent binary on a temporary unix socket (loopback only: no
TCP port, no network) with small work bounds, then for a bounded time
(--seconds of load, --max-requests; a watchdog ends everything 180 s later):

* well-behaved tenants (namespaces; a thread per pod) upload their model files
  as blobs (HEAD, then PUT), register them, prepare (compile) them with a few
  option sets, generate (plain and streamed), hang up mid-generation now and
  then, list the cache (they must see only their own models), release and
  re-upload blobs, delete their entries, and restart their pods (new token,
  old one removed). 429/503 are retried after Retry-After. Every generate's
  latency is recorded, first without the hostile tenant, then with it;
* one hostile tenant arrives after the first phase and tries each attack of
  the README's threat model, each with the answer it must get; then floods
  the CPU with generates until the end.

At the end: requests served and refused by status and code, latency of the
well-behaved tenants per phase, the agent's RSS (peak and current), the
attack table, and an integrity check of the cache on disk after the agent
stopped (every blob hashes to its name, every entry's files match its
entry.json, every entry's key is derived from its inputs, every assembled
model gives its digest, no temporary file left). Exits 1 when an attack got
an unexpected answer, a well-behaved request failed or saw another tenant's
entry, the agent died or did not stop cleanly on SIGTERM, or the cache holds
a mismatch. Rows marked FINDING are known agent bugs this soak found: they
are reported, and fail the run only with --strict.

Python 3 standard library only. Run agent/soak.sh (builds the release agent
first), or: python3 agent/soak.py --agent PATH/rm-agent [--gguf FILE] [-v]
"""

import argparse
import array
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

# ---------------------------------------------------------------------------
# HTTP/1.1 over the unix socket (one connection per request, as pods do)
# ---------------------------------------------------------------------------


class Resp:
    def __init__(self, status, headers, body, elapsed):
        self.status, self.headers, self.body, self.elapsed = status, headers, body, elapsed

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def code(self):
        """The error code of a refusal, as the agent names it."""
        if self.status < 400:
            return ""
        j = self.json()
        if isinstance(j, dict) and isinstance(j.get("error"), dict):
            return j["error"].get("code") or "?"
        return "(no JSON body)" if not self.body else "(plain text body)"

    def message(self):
        j = self.json()
        if isinstance(j, dict) and isinstance(j.get("error"), dict):
            return j["error"].get("message", "")
        return self.body[:200].decode("utf-8", "replace")

    def __repr__(self):
        return "%d %s %s" % (self.status, self.code(), self.message()[:160])


NO_ANSWER = 0  # status recorded when the connection ended without an answer


def _head(method, path, token, headers, length, chunked):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: rm-agent", "Connection: close"]
    if token:
        lines.append("Authorization: Bearer " + token)
    for k, v in headers:
        lines.append("%s: %s" % (k, v))
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append("Content-Length: %d" % length)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _dechunk(body):
    out, pos = bytearray(), 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            break
        try:
            n = int(body[pos:end].split(b";")[0].strip() or b"0", 16)
        except ValueError:
            break
        pos = end + 2
        if n == 0:
            break
        out += body[pos:pos + n]
        pos += n + 2
    return bytes(out)


def parse_answer(raw, elapsed):
    split = raw.find(b"\r\n\r\n")
    if split < 0:
        return Resp(NO_ANSWER, {}, raw, elapsed)
    head = raw[:split].decode("latin-1").split("\r\n")
    try:
        status = int(head[0].split(" ")[1])
    except (IndexError, ValueError):
        return Resp(NO_ANSWER, {}, raw, elapsed)
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = raw[split + 4:]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    return Resp(status, headers, body, elapsed)


def connect(sock_path, timeout):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    return s


def read_all(s):
    chunks = []
    while True:
        try:
            b = s.recv(1 << 16)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


def http(sock_path, method, path, token=None, body=None, headers=(), timeout=60.0):
    """One request; the agent may answer before it reads the body (a refused
    upload) and close: what it answered is still read."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers = tuple(headers) + (("Content-Type", "application/json"),)
    body = body or b""
    t = time.monotonic()
    s = connect(sock_path, timeout)
    try:
        try:
            s.sendall(_head(method, path, token, headers, len(body), False) + body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = read_all(s)
    finally:
        s.close()
    return parse_answer(raw, time.monotonic() - t)


class Stream:
    """A request whose answer is read as NDJSON lines, as they come."""

    def __init__(self, sock_path, path, token, body, timeout=60.0):
        self.t0 = time.monotonic()
        self.s = connect(sock_path, timeout)
        data = json.dumps(body).encode()
        self.s.sendall(_head("POST", path, token, (("Content-Type", "application/json"),), len(data), False) + data)
        self.f = self.s.makefile("rb")
        line = self.f.readline()
        try:
            self.status = int(line.split(b" ")[1])
        except (IndexError, ValueError):
            self.status = NO_ANSWER
        self.headers = {}
        while True:
            line = self.f.readline()
            if not line or line in (b"\r\n", b"\n"):
                break
            k, _, v = line.decode("latin-1").partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()

    def body_resp(self):
        """A refusal (not a stream): the whole answer."""
        body = self.f.read()
        if self.chunked:
            body = _dechunk(body)
        self.close()
        return Resp(self.status, self.headers, body, time.monotonic() - self.t0)

    def events(self):
        if not self.chunked:
            for line in self.f.read().splitlines():
                if line.strip():
                    yield json.loads(line)
            return
        buf = b""
        while True:
            size = self.f.readline()
            if not size:
                return
            try:
                n = int(size.split(b";")[0].strip() or b"0", 16)
            except ValueError:
                return
            if n == 0:
                return
            buf += self.f.read(n)
            self.f.read(2)
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield json.loads(line)

    def close(self):
        """Hang up: the connection is closed at once (FIN), whatever else
        holds the socket."""
        for f in (lambda: self.f.close(), lambda: self.s.shutdown(socket.SHUT_RDWR), lambda: self.s.close()):
            try:
                f()
            except OSError:
                pass


# ---------------------------------------------------------------------------
# Tokens (as the device plugin writes them) and models (tiny random llamas)
# ---------------------------------------------------------------------------


def write_token(state, token, namespace, pod, bound=True, expires_unix_ms=None):
    sha = hashlib.sha256(token.encode()).hexdigest()
    rec = {"version": 1, "tokenSha256": sha, "resourceName": "rm-abstract.io/agent",
           "deviceIds": ["agent::" + sha[:8]], "devices": [], "createdUnixMs": int(time.time() * 1000),
           "agentSlot": True}
    if bound:
        rec["owner"] = {"namespace": namespace, "pod": pod}
    if expires_unix_ms is not None:
        rec["expiresUnixMs"] = expires_unix_ms
    d = os.path.join(state, "tokens")
    tmp = os.path.join(d, ".%s.tmp" % sha)
    with open(tmp, "w") as f:
        f.write(json.dumps(rec))
    os.rename(tmp, os.path.join(d, sha + ".json"))


def remove_token(state, token):
    sha = hashlib.sha256(token.encode()).hexdigest()
    try:
        os.remove(os.path.join(state, "tokens", sha + ".json"))
    except FileNotFoundError:
        pass


def write_safetensors(path, tensors):
    """tensors: list of (name, shape, array('f'))."""
    header, offset = {}, 0
    for name, shape, data in tensors:
        n = len(data) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, data in tensors:
            if sys.byteorder != "little":
                data = array.array("f", data)
                data.byteswap()
            f.write(data.tobytes())


def write_llama(d, seed, vocab=256, hidden=64, inter=128, layers=2, heads=4, kv=2, context=256):
    """A random-weight llama (config.json + model.safetensors), like the
    tests' tiny_llama. Large tensors repeat a random block (they are only
    compiled, and a block keeps writing them fast)."""
    os.makedirs(d, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "vocab_size": vocab, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": context, "bos_token_id": 1,
           "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu",
           "torch_dtype": "float32"}
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write(json.dumps(cfg, indent=2))
    rng = random.Random(seed)
    hd = hidden // heads

    def w(*shape, scale=0.3):
        n = 1
        for x in shape:
            n *= x
        if n <= 65536:
            return array.array("f", (rng.uniform(-scale, scale) for _ in range(n)))
        block = array.array("f", (rng.uniform(-scale, scale) for _ in range(4099)))
        a = block * (n // len(block) + 1)
        return a[:n]

    def ones(n):
        return array.array("f", (1.0 + rng.uniform(-0.1, 0.1) for _ in range(n)))

    t = [("model.embed_tokens.weight", (vocab, hidden), w(vocab, hidden, scale=1.0)),
         ("model.norm.weight", (hidden,), ones(hidden)),
         ("lm_head.weight", (vocab, hidden), w(vocab, hidden))]
    for i in range(layers):
        p = "model.layers.%d." % i
        t += [(p + "input_layernorm.weight", (hidden,), ones(hidden)),
              (p + "post_attention_layernorm.weight", (hidden,), ones(hidden)),
              (p + "self_attn.q_proj.weight", (heads * hd, hidden), w(heads * hd, hidden)),
              (p + "self_attn.k_proj.weight", (kv * hd, hidden), w(kv * hd, hidden)),
              (p + "self_attn.v_proj.weight", (kv * hd, hidden), w(kv * hd, hidden)),
              (p + "self_attn.o_proj.weight", (hidden, heads * hd), w(hidden, heads * hd)),
              (p + "mlp.gate_proj.weight", (inter, hidden), w(inter, hidden)),
              (p + "mlp.up_proj.weight", (inter, hidden), w(inter, hidden)),
              (p + "mlp.down_proj.weight", (hidden, inter), w(hidden, inter))]
    write_safetensors(os.path.join(d, "model.safetensors"), t)
    return d


def write_long_tokenizer(d, n):
    """A valid tokenizer.json (WordLevel) whose every token decodes to about
    `n` characters: a model file a tenant may well upload."""
    vocab = {("t%03d" % i) + "x" * n: i for i in range(TINY_VOCAB)}
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
          "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
          "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t000" + "x" * n}}
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tj, f)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def model_files(d):
    """(relative path, sha256, size) of a model directory's files."""
    out = []
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        out.append((name, file_sha256(p), os.path.getsize(p), p))
    return out


# ---------------------------------------------------------------------------
# The soak
# ---------------------------------------------------------------------------

TINY_VOCAB = 256
# Option sets the well-behaved tenants prepare with (each a compile once).
VARIANTS = [{}, {"precision": "q8_0"}, {"precision": "q4"}, {"precision": "fp16"},
            {"maxSeqLen": 128}, {"precision": "q8_0", "maxSeqLen": 192}]
HIDDEN_CONTEXT = 4096  # the hostile's own model: room for long generations


class Stop(Exception):
    pass


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(-(-p * len(v) // 100)) - 1))  # nearest rank
    return v[k]


class Soak:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="rm-soak-")
        self.sock = os.path.join(self.tmp, "run", "agent.sock")
        self.cache = os.path.join(self.tmp, "cache")
        self.state = os.path.join(self.tmp, "state")
        self.root = os.path.join(self.tmp, "models")  # --model-path-allow
        for d in (os.path.dirname(self.sock), self.cache, os.path.join(self.state, "tokens"), self.root):
            os.makedirs(d, exist_ok=True)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.requests = 0
        self.counts = Counter()  # (role, status, code) -> n
        self.unexpected = []  # well-behaved answers that were not expected
        self.lat = []  # (t_start, t_end, seconds, kind) of well-behaved generates
        self.events = Counter()  # things that happened (hang-ups, re-prepares, ...)
        self.leaks = {}  # what the hostile knows of the others (digests, keys, shas)
        self.attacks = []  # (name, expected, got, ok)
        self.isolation = []  # listings that showed another namespace's entry
        self.flood_window = None
        self.t_ready = None  # when every pod had its model prepared
        self.pods_ready = 0
        self.health = []  # (t, seconds, ok) of /healthz probes
        self.trace_lines = []
        self.rss_max_kib = 0
        self.agent = None
        self.agent_died = None
        self.t0 = None

    # -- bookkeeping --------------------------------------------------------

    def count(self, role, resp, what=""):
        with self.lock:
            self.counts[(role, resp.status, resp.code() or what)] += 1

    def take(self, role):
        """A request is about to be sent: counts it, and ends the soak at
        the cap (attacks always run)."""
        with self.lock:
            self.requests += 1
            if self.requests >= self.args.max_requests:
                self.stop.set()
        if role == "good" and self.stop.is_set():
            raise Stop()

    def call(self, role, token, method, path, body=None, headers=(), timeout=60.0):
        self.take(role)
        try:
            r = http(self.sock, method, path, token, body, headers, timeout)
        except (socket.timeout, OSError) as e:
            r = Resp(NO_ANSWER, {}, ("%s: %s" % (type(e).__name__, e)).encode(), 0.0)
        self.count(role, r)
        self.trace(role, method, path, body, r)
        return r

    def trace(self, role, method, path, body, r, t_end=None):
        """One line per request in <tmp>/requests.log (start, seconds, who,
        what, answer)."""
        t_end = t_end or time.monotonic()
        what = ""
        if isinstance(body, dict):
            what = " ".join("%s=%s" % (k, body[k]) for k in ("max_new_tokens", "stream", "options") if k in body)
            if "input_ids" in body:
                what += " prompt=%d" % len(body["input_ids"])
        with self.lock:
            self.trace_lines.append("%8.3f %7.3f %-5s %-6s %-40s %3d %s %s" % (
                t_end - r.elapsed - (self.t0 or 0), r.elapsed, role, method, path[:40], r.status, r.code(), what))

    def event(self, name, n=1):
        with self.lock:
            self.events[name] += n

    def attack(self, name, expected, got, ok, note="", elapsed=None, kind="check"):
        """kind: "check" (an unexpected answer fails the soak), "finding" (a
        known agent bug: reported, fails only with --strict), "info"."""
        if elapsed is not None:
            note = ("%.0f ms " % (elapsed * 1000)) + note
        verdict = "ok" if ok else {"check": "UNEXPECTED", "finding": "FINDING", "info": "info"}[kind]
        with self.lock:
            self.attacks.append((name, expected, got, verdict, note))
        self.log("attack %-28s expected %-26s got %-30s %s%s" % (
            name, expected, got, verdict, ("  " + note) if note else ""))

    def log(self, msg):
        if self.args.verbose:
            print("[%6.1f] %s" % (time.monotonic() - (self.t0 or time.monotonic()), msg), flush=True)

    # -- the agent ---------------------------------------------------------

    def start_agent(self, cache_max):
        a = self.args
        cmd = [a.agent, "--socket", self.sock, "--cache-dir", self.cache, "--state-dir", self.state,
               "--model-path-allow", self.root,
               "--max-queued-per-namespace", str(a.max_queued_per_namespace),
               "--max-queued", str(a.max_queued),
               "--request-timeout", str(a.request_timeout),
               "--max-upload-bytes", str(a.max_upload),
               "--namespace-quota", str(a.namespace_quota),
               "--min-free-disk", "64M",
               "--max-concurrent-compiles", "2",
               "--max-queued-compiles-per-namespace", str(a.max_queued_compiles),
               "--cache-max-bytes", str(cache_max)]
        self.agent_cmd = cmd
        self.agent_log = open(os.path.join(self.tmp, "agent.log"), "wb")
        # Warnings, and the cpu backend's model loads (counted in the report).
        env = dict(os.environ, RM_LOG=os.environ.get(
            "RM_LOG", "warn,rm_agent::backend::cpu=info,rm_agent::backend::cpu::engine=warn"))
        env.update(kv.split("=", 1) for kv in a.agent_env)
        self.agent = subprocess.Popen(cmd, stdout=self.agent_log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                break
            if os.path.exists(self.sock):
                try:
                    if http(self.sock, "GET", "/healthz", timeout=2).status == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError("rm-agent did not start:\n" + self.agent_log_tail())

    def agent_log_tail(self, n=40):
        try:
            with open(os.path.join(self.tmp, "agent.log"), "rb") as f:
                return b"".join(f.readlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def proc_status(self, field):
        try:
            with open("/proc/%d/status" % self.agent.pid) as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def agent_cpu(self):
        try:
            with open("/proc/%d/stat" % self.agent.pid) as f:
                x = f.read().rsplit(")", 1)[1].split()
            return (int(x[11]) + int(x[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return float("nan")

    def monitor(self):
        while not self.stop.is_set() or self.monitoring:
            if self.agent.poll() is not None:
                if self.agent_died is None and self.monitoring:
                    self.agent_died = "exited with %s during the soak" % self.agent.returncode
                    self.stop.set()
                return
            self.rss_max_kib = max(self.rss_max_kib, self.proc_status("VmRSS"))
            time.sleep(0.25)

    def prober(self):
        """GET /healthz every 0.2 s: how quickly the agent answers at all."""
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                r = http(self.sock, "GET", "/healthz", timeout=30)
                ok = r.status == 200
            except OSError:
                ok = False
            with self.lock:
                self.health.append((t, time.monotonic() - t, ok))
            time.sleep(0.2)

    def metrics(self, token):
        r = http(self.sock, "GET", "/metrics", token, timeout=10)
        out = {}
        for line in r.body.decode("utf-8", "replace").splitlines():
            if line and not line.startswith("#"):
                name, _, v = line.rpartition(" ")
                try:
                    out[name] = float(v)
                except ValueError:
                    pass
        return out

    # -- run ---------------------------------------------------------------

    def run(self):
        a = self.args
        t_setup = time.monotonic()
        # Models: tenants 0 and 1 (and the hostile) hold the same "public"
        # weights; the others have their own.
        self.tenants = []
        for i in range(a.tenants):
            seed = 1000 if i < 2 else 1000 + i
            d = os.path.join(self.tmp, "pods", "t%d" % i)
            write_llama(d, seed)
            self.tenants.append({"ns": "soak-t%d" % i, "dir": d, "files": model_files(d), "gguf": False})
        gguf_size = 0
        if a.gguf:
            # One tenant serves a real GGUF by node path (inside the root).
            dst = os.path.join(self.root, "smollm2", os.path.basename(a.gguf))
            os.makedirs(os.path.dirname(dst))
            try:
                os.link(a.gguf, dst)
            except OSError:
                shutil.copyfile(a.gguf, dst)
            gguf_size = os.path.getsize(dst)
            self.tenants.append({"ns": "soak-gguf", "dir": None, "path": dst, "gguf": True})
        # The hostile's own models: a tiny one with a long context (uploaded),
        # the public one (uploaded), and a larger one on a node path (many
        # compiles at once).
        self.evil_dir = write_llama(os.path.join(self.tmp, "pods", "evil"), 666, context=HIDDEN_CONTEXT)
        write_long_tokenizer(self.evil_dir, a.token_text)
        self.public_dir = self.tenants[0]["dir"]
        self.big_dir = write_llama(os.path.join(self.root, "evil-big"), 667, vocab=4096, hidden=256,
                                   inter=768, layers=4, heads=8, kv=4, context=2048)
        cache_max = a.cache_max_bytes + gguf_size
        # Reads /metrics (any identified caller may); holds nothing.
        self.observer = "tok-observer-" + os.urandom(6).hex()
        write_token(self.state, self.observer, "soak-observer", "observer")
        self.start_agent(cache_max)
        self.monitoring = True
        threading.Thread(target=self.monitor, daemon=True).start()
        # A watchdog: the whole run is bounded, whatever hangs.
        hard = a.seconds + 180

        def watchdog():
            if not self.done.wait(hard):
                print("soak: watchdog: still running after %d s; killing the agent" % hard, flush=True)
                self.agent.kill()
                os._exit(3)
        self.done = threading.Event()
        threading.Thread(target=watchdog, daemon=True).start()
        setup_s = time.monotonic() - t_setup

        self.t0 = time.monotonic()
        self.t_end = self.t0 + a.seconds
        self.t_phase2 = self.t0 + a.seconds * a.phase1
        pods = []
        for i, t in enumerate(self.tenants):
            for j in range(a.pods):
                pods.append(threading.Thread(target=self.good_pod, args=(i, j), daemon=True,
                                             name="pod-%s-%d" % (t["ns"], j)))
        for p in pods:
            p.start()
        hostile = threading.Thread(target=self.hostile, daemon=True, name="hostile")
        threading.Thread(target=self.prober, daemon=True).start()
        while time.monotonic() < self.t_phase2 and not self.stop.is_set():
            time.sleep(0.1)
        hostile.start()
        while time.monotonic() < self.t_end and not self.stop.is_set():
            time.sleep(0.1)
        self.stop.set()
        t_stop = time.monotonic()
        for p in pods + [hostile]:
            p.join(timeout=max(1.0, a.request_timeout + 15 - (time.monotonic() - t_stop)))
        stuck = [p.name for p in pods + [hostile] if p.is_alive()]
        load_s = time.monotonic() - self.t0

        # Let detached compiles finish, then read the agent's state.
        alive = self.agent.poll() is None
        m = {}
        if alive:
            tok = self.observer
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                m = self.metrics(tok)
                if m.get("rm_agent_compiles_running", 0) == 0:
                    break
                time.sleep(0.2)
        rss_now = self.proc_status("VmRSS")
        self.cpu_agent = self.agent_cpu()
        self.cpu_client = sum(os.times()[:2])
        hwm = self.proc_status("VmHWM")
        self.monitoring = False
        if not alive and self.agent_died is None:
            self.agent_died = "exited with %s" % self.agent.returncode
        # Graceful stop: SIGTERM, open requests finish, socket removed.
        stop_rc, stop_s = None, None
        if alive:
            t = time.monotonic()
            self.agent.send_signal(signal.SIGTERM)
            try:
                stop_rc = self.agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                stop_rc = "did not stop within 30 s (killed)"
            stop_s = time.monotonic() - t
        integrity = self.check_cache()
        with open(os.path.join(self.tmp, "requests.log"), "w") as f:
            f.write("\n".join(sorted(self.trace_lines)) + "\n")
        self.done.set()
        return self.report(setup_s, load_s, stuck, m, rss_now, hwm, stop_rc, stop_s, integrity)

    # -- well-behaved tenants ------------------------------------------------

    def retrying(self, fn, tries=10):
        """Calls fn until it is not told 'not now' (429/503, Retry-After)."""
        for _ in range(tries):
            r = fn()
            if r.status not in (429, 503):
                return r
            self.event("good: retried after %d" % r.status)
            try:
                wait = float(r.headers.get("retry-after", "1"))
            except ValueError:
                wait = 1.0
            if time.monotonic() + wait > self.t_end:
                raise Stop()
            time.sleep(wait)
        return r

    def good_pod(self, ti, pj):
        t = self.tenants[ti]
        rng = random.Random(ti * 100 + pj)
        pod = {"ti": ti, "pj": pj, "t": t, "rng": rng, "gen": 0, "token": None, "variant": None}
        try:
            self.new_pod(pod)
            self.setup_model(pod)
            pod["variant"] = 0 if t["gguf"] else (ti + pj) % len(VARIANTS)
            self.prepare(pod, stream=(pj == 1))
            with self.lock:
                self.pods_ready += 1
                if self.pods_ready == len(self.tenants) * self.args.pods:
                    self.t_ready = time.monotonic()
            if ti == 0 and pj == 0:
                self.leaks["public_key_options"] = VARIANTS[pod["variant"]]
            actions = [("gen", 40), ("gen_stream", 25), ("hangup", 6), ("forward", 4), ("variant", 4),
                       ("list", 5), ("restart", 2), ("release", 2), ("delete", 2)]
            if t["gguf"]:
                actions = [a for a in actions if a[0] not in ("variant", "release", "forward")]
            names, weights = zip(*actions)
            while not self.stop.is_set() and time.monotonic() < self.t_end:
                act = rng.choices(names, weights)[0]
                getattr(self, "act_" + act)(pod)
                time.sleep(rng.uniform(0.02, self.args.think))
        except Stop:
            pass
        except Exception as e:  # a bug in the soak or an agent answer it cannot read
            with self.lock:
                self.unexpected.append("%s pod %d: %s: %s" % (t["ns"], pj, type(e).__name__, e))

    def expect(self, pod, r, what, ok=(200,)):
        if r.status not in ok:
            with self.lock:
                self.unexpected.append("%s %s: %r" % (pod["t"]["ns"], what, r))
            return False
        return True

    def new_pod(self, pod):
        """A pod (re)starts: a new token for it, the old one removed, as the
        device plugin does."""
        t = pod["t"]
        old = pod["token"]
        pod["gen"] += 1
        name = "%s-pod-%d-%d" % (t["ns"], pod["ti"], pod["gen"])
        token = "tok-%s-%s" % (name, os.urandom(6).hex())
        write_token(self.state, token, t["ns"], name)
        pod["token"] = token
        if old:
            remove_token(self.state, old)
            self.event("good: pod restarted (token replaced)")

    def setup_model(self, pod):
        """Upload (HEAD, then PUT what is missing) and register. A register
        may find a blob gone (the tenant's other pod released it between
        the HEAD and the register): upload again."""
        t, tok = pod["t"], pod["token"]
        for attempt in range(4):
            if t["gguf"]:
                r = self.retrying(lambda: self.call("good", tok, "POST", "/v1/models", {"source": {"path": t["path"]}}))
            else:
                for name, sha, size, path in t["files"]:
                    r = self.call("good", tok, "HEAD", "/v1/blobs/" + sha)
                    if r.status == 404:
                        with open(path, "rb") as f:
                            data = f.read()
                        r = self.retrying(lambda: self.call("good", tok, "PUT", "/v1/blobs/" + sha, data,
                                                            (("Content-Type", "application/octet-stream"),)))
                        self.expect(pod, r, "PUT blob")
                        self.event("good: blobs uploaded")
                    else:
                        self.expect(pod, r, "HEAD blob")
                files = [{"path": n, "sha256": s} for n, s, _, _ in t["files"]]
                r = self.retrying(lambda: self.call("good", tok, "POST", "/v1/models", {"source": {"files": files}}))
            if r.status != 404 or t["gguf"]:
                break
            self.event("good: register found a blob released meanwhile -> uploaded again")
        if self.expect(pod, r, "register"):
            pod["model"] = r.json()["model"]
            t["model"] = pod["model"]
            if pod["ti"] == 2:
                self.leaks["victim_model"] = pod["model"]
                self.leaks["victim_blob"] = t["files"][1][1]  # its weights

    def prepare(self, pod, stream=False):
        tok = pod["token"]
        body = {"model": pod["model"], "device": "cpu", "options": VARIANTS[pod["variant"]]}
        if stream:
            body["stream"] = True

            def once():
                self.take("good")
                try:
                    s = Stream(self.sock, "/v1/prepare", tok, body, timeout=120)
                except OSError as e:
                    return Resp(NO_ANSWER, {}, str(e).encode(), 0)
                if s.status != 200:
                    r = s.body_resp()
                    self.count("good", r)
                    return r
                last = None
                for ev in s.events():
                    last = ev
                s.close()
                if last and last.get("event") == "done":
                    r = Resp(200, {}, json.dumps(last).encode(), time.monotonic() - s.t0)
                else:
                    st = (last or {}).get("status", NO_ANSWER)
                    r = Resp(st, {}, json.dumps({"error": last}).encode(), 0)
                self.count("good", r)
                return r
            r = self.retrying(once)
        else:
            r = self.retrying(lambda: self.call("good", tok, "POST", "/v1/prepare", body, timeout=120))
        if r.status == 404:
            # The model's grant or its blobs are gone (released): upload again.
            self.setup_model(pod)
            body.pop("stream", None)
            body["model"] = pod["model"]
            r = self.retrying(lambda: self.call("good", tok, "POST", "/v1/prepare", body, timeout=120))
        if self.expect(pod, r, "prepare %s" % VARIANTS[pod["variant"]]):
            j = r.json()
            pod["key"] = j["key"]
            if pod["ti"] == 2 and pod["pj"] == 0:
                self.leaks["victim_key"] = pod["key"]
            self.event("good: prepares (compiled)" if not j.get("cached", True) else "good: prepares (cache hit)")

    def gen_body(self, pod, n_new):
        rng = pod["rng"]
        if pod["t"]["gguf"]:
            prompts = ["The capital of France is", "Water boils at", "A soak test checks that",
                       "Kubernetes schedules pods on"]
            return {"key": pod["key"], "device": "cpu", "prompt": rng.choice(prompts), "max_new_tokens": min(n_new, 16)}
        b = {"key": pod["key"], "device": "cpu",
             "input_ids": [rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(4, 24))],
             "max_new_tokens": n_new, "ignore_eos": True}
        if rng.random() < 0.3:
            b.update(do_sample=True, temperature=0.8, top_k=40, seed=rng.randrange(1 << 30))
        return b

    def record(self, pod, t_start, kind):
        t_end = time.monotonic()
        what = "%s %s %s" % (pod["t"]["ns"], kind, "gguf" if pod["t"]["gguf"] else VARIANTS[pod["variant"]])
        with self.lock:
            self.lat.append((t_start, t_end, t_end - t_start, what))

    def after_gone(self, pod, r, what):
        """A generate on an entry that is gone (evicted by the LRU, or deleted
        by the tenant's other pod): prepare again."""
        if r.status == 404:
            self.event("good: entry gone (evicted/deleted) -> prepared again")
            self.prepare(pod)
            return True
        self.expect(pod, r, what)
        return False

    def act_gen(self, pod):
        body = self.gen_body(pod, pod["rng"].randint(8, 32))
        t = time.monotonic()
        r = self.retrying(lambda: self.call("good", pod["token"], "POST", "/v1/generate", body))
        if r.status == 200:
            self.record(pod, t, "plain")
        else:
            self.after_gone(pod, r, "generate")

    def stream_call(self, pod, body, hang_up_after=None):
        self.take("good")
        try:
            s = Stream(self.sock, "/v1/generate", pod["token"], body)
        except OSError as e:
            r = Resp(NO_ANSWER, {}, str(e).encode(), 0)
            self.count("good", r)
            return r
        if s.status != 200:
            r = s.body_resp()
            self.count("good", r)
            return r
        n, last = 0, None
        try:
            for ev in s.events():
                last = ev
                if ev.get("event") == "token":
                    n += 1
                    if hang_up_after is not None and n >= hang_up_after:
                        s.close()
                        self.count("good", Resp(200, {}, b"", 0), "")
                        self.trace("good", "HANGUP", "/v1/generate", body, Resp(200, {}, b"", time.monotonic() - s.t0))
                        return None
        finally:
            s.close()
        el = time.monotonic() - s.t0
        if last and last.get("event") == "done":
            r = Resp(200, {}, json.dumps(last).encode(), el)
        else:
            r = Resp((last or {}).get("status", NO_ANSWER), {}, json.dumps({"error": last}).encode(), el)
        self.count("good", r)
        self.trace("good", "STREAM", "/v1/generate", body, r)
        return r

    def act_gen_stream(self, pod):
        body = self.gen_body(pod, pod["rng"].randint(8, 32))
        body["stream"] = True
        t = time.monotonic()
        r = self.retrying(lambda: self.stream_call(pod, body))
        if r.status == 200:
            self.record(pod, t, "stream")
        else:
            self.after_gone(pod, r, "generate (stream)")

    def act_hangup(self, pod):
        body = self.gen_body(pod, 64 if not pod["t"]["gguf"] else 16)
        body["stream"] = True
        r = self.retrying(lambda: self.stream_call(pod, body, hang_up_after=2) or Resp(200, {}, b"", 0))
        if r.status == 200:
            self.event("good: hung up mid-generation")
        else:
            self.after_gone(pod, r, "generate (hang-up)")

    def act_forward(self, pod):
        body = {"key": pod["key"], "device": "cpu",
                "input_ids": [pod["rng"].randrange(3, TINY_VOCAB) for _ in range(8)], "logits_to_keep": 1}
        r = self.retrying(lambda: self.call("good", pod["token"], "POST", "/v1/forward", body))
        if r.status == 200:
            self.event("good: forwards")
        else:
            self.after_gone(pod, r, "forward")

    def act_variant(self, pod):
        pod["variant"] = pod["rng"].randrange(len(VARIANTS))
        self.prepare(pod)

    def act_list(self, pod):
        r = self.retrying(lambda: self.call("good", pod["token"], "GET", "/v1/cache"))
        if self.expect(pod, r, "list cache"):
            mine = {pod["t"].get("model")}
            if pod["ti"] in (0, 1):
                mine |= {self.tenants[0].get("model")}
            others = [e["key"] for e in r.json().get("entries", []) if e.get("model_digest") not in mine]
            if others:
                with self.lock:
                    self.isolation.append("%s saw %d entries of other models" % (pod["t"]["ns"], len(others)))

    def act_restart(self, pod):
        self.new_pod(pod)
        self.setup_model(pod)
        self.prepare(pod)

    def act_release(self, pod):
        """Releases the weights' blob and uploads it again (HEAD 404, PUT)."""
        name, sha, _, _ = pod["t"]["files"][1]
        r = self.call("good", pod["token"], "DELETE", "/v1/blobs/" + sha)
        # 404: the tenant's other pod released it a moment ago.
        if self.expect(pod, r, "DELETE own blob", ok=(200, 404)):
            self.event("good: blobs released")
        self.setup_model(pod)

    def act_delete(self, pod):
        r = self.call("good", pod["token"], "DELETE", "/v1/cache/" + pod["key"])
        # 403: the model is shared with another namespace; 409: in use (the
        # tenant's other pod generating); 404: already gone.
        if self.expect(pod, r, "DELETE own entry", ok=(200, 403, 404, 409)):
            self.event("good: DELETE own entry -> %d" % r.status)
        if r.status in (200, 404):
            self.prepare(pod)

    # -- the hostile tenant ----------------------------------------------------

    def hostile(self):
        try:
            self._hostile()
        except Exception as e:
            import traceback
            self.attack("hostile thread", "runs to its end", "%s: %s" % (type(e).__name__, e), False,
                        traceback.format_exc().splitlines()[-3].strip())

    def evil(self, method, path, body=None, token=None, headers=(), timeout=60.0):
        """A request of the hostile tenant (token "": none at all)."""
        return self.call("evil", self.evil_token if token is None else token, method, path, body, headers, timeout)

    def _hostile(self):
        a = self.args
        self.evil_token = "tok-evil-" + os.urandom(6).hex()
        write_token(self.state, self.evil_token, "soak-evil", "evil-pod")
        # Wait for what leaks of the others (their digests, keys, blob shas).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                k in self.leaks for k in ("victim_model", "victim_key", "victim_blob", "public_key_options")):
            time.sleep(0.1)
        victim_model, victim_key = self.leaks.get("victim_model"), self.leaks.get("victim_key")
        victim_blob = self.leaks.get("victim_blob")

        # Its own models, uploaded like anyone's.
        own = {}
        for label, d in (("evil", self.evil_dir), ("public", self.public_dir)):
            files = model_files(d)
            for name, sha, size, path in files:
                if self.evil("HEAD", "/v1/blobs/" + sha).status != 200:
                    with open(path, "rb") as f:
                        r = self.evil("PUT", "/v1/blobs/" + sha, f.read())
                    assert r.status == 200, r
            r = self.evil("POST", "/v1/models", {"source": {"files": [{"path": n, "sha256": s} for n, s, _, _ in files]}})
            assert r.status == 200, r
            own[label] = r.json()["model"]
        r = self.evil("POST", "/v1/prepare", {"model": own["evil"], "device": "cpu"})  # candle, f32
        assert r.status == 200, r
        slow_key = r.json()["key"]
        r = self.evil("POST", "/v1/prepare", {"model": own["evil"], "device": "cpu", "options": {"precision": "q8_0"}})
        assert r.status == 200, r
        fast_key = r.json()["key"]
        r = self.evil("POST", "/v1/prepare", {"model": own["public"], "device": "cpu",
                                              "options": self.leaks.get("public_key_options", {})})
        assert r.status == 200, r
        public_key = r.json()["key"]

        def one(name, expected, r, fast=None, note=""):
            ok = r.status in expected
            if fast is not None and r.elapsed > fast:
                ok, note = False, ("answered after %.1f s (limit %.0f s) " % (r.elapsed, fast)) + note
            got = "%d %s" % (r.status, r.code()) if r.status else "no answer"
            self.attack(name, "/".join(str(s) for s in expected), got, ok, note, r.elapsed)
            return r

        # --- tokens ---
        one("no token", (401,), self.evil("GET", "/v1/cache", token=""))
        one("unknown token", (401,), self.evil("GET", "/v1/cache", token="not-a-token-" + os.urandom(8).hex()))
        old = "tok-evil-old-" + os.urandom(6).hex()
        write_token(self.state, old, "soak-evil", "evil-old-pod")
        before = self.evil("GET", "/v1/cache", token=old).status
        remove_token(self.state, old)
        r = self.evil("GET", "/v1/cache", token=old)
        one("token of a removed pod", (401,), r, note="(%d while the pod lived)" % before)
        exp = "tok-evil-expired-" + os.urandom(6).hex()
        write_token(self.state, exp, "soak-evil", "evil-lapsed", expires_unix_ms=int(time.time() * 1000) - 1000)
        one("token whose lease lapsed", (401,), self.evil("GET", "/v1/cache", token=exp))
        unb = "tok-evil-unbound-" + os.urandom(6).hex()
        write_token(self.state, unb, "soak-evil", "x", bound=False)
        r = self.evil("GET", "/v1/cache", token=unb)
        one("token not bound to a pod", (503,), r, fast=6,
            note="Retry-After: %s, after %.1f s" % (r.headers.get("retry-after"), r.elapsed))
        one("slot token asks for gpu:0", (403,),
            self.evil("POST", "/v1/prepare", {"model": own["evil"], "device": "gpu:0"}))

        # --- other tenants' models, entries and blobs ---
        one("prepare another's model by digest", (404,),
            self.evil("POST", "/v1/prepare", {"model": victim_model, "device": "cpu"}))
        one("generate on another's key", (404,),
            self.evil("POST", "/v1/generate", {"key": victim_key, "input_ids": [1, 5, 9], "max_new_tokens": 4}))
        r = self.evil("POST", "/v1/generate", {"key": victim_key, "input_ids": [1, 5, 9], "max_new_tokens": 4,
                                               "stream": True})
        # A streamed answer starts with 200; a refusal is its error event.
        evs = [json.loads(x) for x in r.body.splitlines() if x.strip()] if r.status == 200 else []
        toks = [e for e in evs if e.get("event") == "token"]
        err = evs[-1] if evs and evs[-1].get("event") == "error" else {}
        self.attack("generate (stream) on another's key", "200 + error event 404",
                    "%d + %s, %d tokens" % (r.status, ("error event %s %s" % (err.get("status"), err.get("code")))
                                            if err else "no error event", len(toks)),
                    r.status == 200 and err.get("status") == 404 and not toks)
        one("forward on another's key", (404,),
            self.evil("POST", "/v1/forward", {"key": victim_key, "input_ids": [1, 5, 9]}))
        victim_key = self.leaks.get("victim_key")  # its current entry
        exists = os.path.isdir(os.path.join(self.cache, "entries", victim_key))
        one("GET another's cache entry", (404,), self.evil("GET", "/v1/cache/" + victim_key),
            note="(the entry exists: %s)" % ("yes" if exists else "no"))
        one("DELETE another's cache entry", (404,), self.evil("DELETE", "/v1/cache/" + victim_key))
        one("DELETE an entry shared with others", (403,), self.evil("DELETE", "/v1/cache/" + public_key))
        r = self.evil("GET", "/v1/cache")
        mine = set(own.values())
        seen = [e for e in (r.json() or {}).get("entries", []) if e.get("model_digest") not in mine]
        self.attack("list cache: sees only its own", "200, 0 others",
                    "%d, %d others" % (r.status, len(seen)), r.status == 200 and not seen)
        r = self.evil("GET", "/v1/compiles")
        seen = [c for c in (r.json() or {}).get("compiles", []) if c.get("model") not in mine]
        self.attack("list compiles: sees only its own", "200, 0 others",
                    "%d, %d others" % (r.status, len(seen)), r.status == 200 and not seen)
        one("HEAD another's blob", (404,), self.evil("HEAD", "/v1/blobs/" + victim_blob))
        one("GET another's blob", (404,), self.evil("GET", "/v1/blobs/" + victim_blob))
        one("DELETE another's blob", (404,), self.evil("DELETE", "/v1/blobs/" + victim_blob))
        cfg_sha = model_files(self.evil_dir)[0][1]
        one("register with another's blob", (404,), self.evil("POST", "/v1/models", {"source": {"files": [
            {"path": "config.json", "sha256": cfg_sha}, {"path": "model.safetensors", "sha256": victim_blob}]}}))
        one("register files with '../' path", (400,), self.evil("POST", "/v1/models", {"source": {"files": [
            {"path": "../../etc/passwd", "sha256": cfg_sha}]}}))

        # --- uploads ---
        data = os.urandom(1 << 20)
        sha = hashlib.sha256(data).hexdigest()
        wrong = hashlib.sha256(b"something else").hexdigest()
        one("PUT blob whose body mismatches its SHA", (400,), self.evil("PUT", "/v1/blobs/" + wrong, data))
        r = self.evil("HEAD", "/v1/blobs/" + wrong)
        one("  ...then HEAD that SHA", (404,), r)
        one("upload declared above --max-upload-bytes", (413,), self.upload_declared(a.max_upload + 1), fast=5)
        # Cut off at the allowance: the least of the file limit and what is
        # left of the namespace's quota (the refusal names the one passed).
        one("chunked upload above --max-upload-bytes", (413, 403), self.upload_chunked(a.max_upload + (1 << 20)),
            fast=20)
        # Cut off: half of a 2 MiB blob, then the client hangs up.
        data2 = os.urandom(2 << 20)
        sha2 = hashlib.sha256(data2).hexdigest()
        self.upload_chunked(len(data2), data=data2[:1 << 20], cut=True, sha=sha2)
        time.sleep(1.0)
        left = [n for n in os.listdir(os.path.join(self.cache, "blobs")) if n.startswith(sha2)]
        r = self.evil("HEAD", "/v1/blobs/" + sha2)
        self.attack("chunked upload cut off", "HEAD 404, no file left", "HEAD %d, %d file(s) left" % (r.status, len(left)),
                    r.status == 404 and not left, ", ".join(left))
        # The namespace quota (which counts what the namespace holds on the
        # node): blobs of a quarter of it until refused.
        chunk = a.namespace_quota // 4
        held, statuses = [], []
        for _ in range(6):
            d = os.urandom(chunk)
            s = hashlib.sha256(d).hexdigest()
            r = self.evil("PUT", "/v1/blobs/" + s, d)
            statuses.append(r.status)
            if r.status == 200:
                held.append(s)
            else:
                break
        self.attack("uploads beyond the namespace quota", "200.. then 403 quota_exceeded",
                    ",".join(map(str, statuses)) + " " + r.code(),
                    len(held) >= 1 and statuses[-1] == 403 and r.code() == "quota_exceeded"
                    and len(held) * chunk <= a.namespace_quota,
                    "%d bytes each: %s" % (chunk, r.message()[:200]))
        for s in held:
            self.evil("DELETE", "/v1/blobs/" + s)

        # --- node paths ---
        one("node path outside the allowed root", (403,),
            self.evil("POST", "/v1/models", {"source": {"path": "/etc"}}), fast=5)
        one("node path /dev/zero", (403,), self.evil("POST", "/v1/models", {"source": {"path": "/dev/zero"}}), fast=5)
        z = os.path.join(self.root, "evil-zero")
        os.makedirs(z, exist_ok=True)
        shutil.copy(os.path.join(self.evil_dir, "config.json"), z)
        os.symlink("/dev/zero", os.path.join(z, "model.safetensors"))
        one("symlink to /dev/zero in the root", (403,),
            self.evil("POST", "/v1/models", {"source": {"path": z}}), fast=5)
        zg = os.path.join(self.root, "evil-zero.gguf")
        os.symlink("/dev/zero", zg)
        one("model.gguf -> /dev/zero", (403,), self.evil("POST", "/v1/models", {"source": {"path": zg}}), fast=5)
        fifo = os.path.join(self.root, "evil-pipe")
        os.mkfifo(fifo)
        fd = os.path.join(self.root, "evil-fifo")
        os.makedirs(fd, exist_ok=True)
        shutil.copy(os.path.join(self.evil_dir, "config.json"), fd)
        os.symlink("../evil-pipe", os.path.join(fd, "model.safetensors"))
        one("symlink to a FIFO in the root", (422,),
            self.evil("POST", "/v1/models", {"source": {"path": fd}}), fast=5)
        fg = os.path.join(self.root, "evil-fifo.gguf")
        os.mkfifo(fg)
        one("a FIFO named model.gguf", (422,), self.evil("POST", "/v1/models", {"source": {"path": fg}}), fast=5)

        # --- options and request bodies ---
        one("trust_remote_code on cpu", (400,), self.evil("POST", "/v1/prepare", {
            "model": own["evil"], "device": "cpu", "options": {"extra": {"trust_remote_code": "true"}}}))
        one("unknown compile option", (400,), self.evil("POST", "/v1/prepare", {
            "model": own["evil"], "device": "cpu", "options": {"precisoin": "q4"}}))
        one("prompt longer than the context", (400,), self.evil("POST", "/v1/generate", {
            "key": slow_key, "input_ids": [5] * (HIDDEN_CONTEXT + 100), "max_new_tokens": 1}))
        one("max_new_tokens 10^9", (400,), self.evil("POST", "/v1/generate", {
            "key": slow_key, "input_ids": [5, 6], "max_new_tokens": 10 ** 9}))
        one("max_new_tokens past the context", (400,), self.evil("POST", "/v1/generate", {
            "key": slow_key, "input_ids": [5, 6], "max_new_tokens": 8000}))
        one("token id outside the vocabulary", (400,), self.evil("POST", "/v1/generate", {
            "key": slow_key, "input_ids": [5, 1 << 31], "max_new_tokens": 1}))
        one("65 prompts in one request", (400,), self.evil("POST", "/v1/generate", {
            "key": slow_key, "input_ids": [[5, 6]] * 65, "max_new_tokens": 1}))
        one("malformed JSON", (400,), self.evil("POST", "/v1/generate", b'{"key": "' + slow_key.encode() + b'", ',
                                                  headers=(("Content-Type", "application/json"),)))
        one("unknown field in a body", (400,), self.evil("POST", "/v1/generate", {
            "key": slow_key, "input_ids": [5], "max_new_tokens": 1, "bogus": True}))
        big = json.dumps({"source": {"path": "x" * (9 << 20)}}).encode()
        one("JSON body of 9 MiB", (413,), self.evil("POST", "/v1/models", big,
                                                     headers=(("Content-Type", "application/json"),)), fast=10)
        one("1 GiB JSON body declared, 9 MiB sent", (413,), self.declared_json(1 << 30, 9 << 20), fast=10)

        # --- connections held open ---
        conns = []
        for _ in range(200):
            try:
                s = connect(self.sock, 30)
                s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: rm-agent\r\n")
                conns.append(s)
            except OSError:
                break
        r = http(self.sock, "GET", "/healthz", timeout=10)
        self.take("evil")
        self.count("evil", r)
        one("200 half-sent requests held open, then /healthz", (200,), r, fast=2,
            note="%d connections open, healthz in %.0f ms" % (len(conns), r.elapsed * 1000))
        for s in conns:
            s.close()

        # --- many compiles at once (different options) ---
        r = self.evil("POST", "/v1/models", {"source": {"path": self.big_dir}})
        assert r.status == 200, r
        big_model = r.json()["model"]
        results = [None] * a.compile_flood
        barrier = threading.Barrier(a.compile_flood)

        def compile_one(i):
            barrier.wait()
            results[i] = self.evil("POST", "/v1/prepare", {"model": big_model, "device": "cpu",
                                                           "options": {"precision": "q8_0", "maxSeqLen": 1000 + i}},
                                   timeout=120)
        ths = [threading.Thread(target=compile_one, args=(i,)) for i in range(a.compile_flood)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        st = Counter(r.status for r in results)
        # Its uploads may have filled its quota by now: compiles are then
        # refused with 403 (each compile is promised the model's size).
        self.attack("%d prepares, different options" % a.compile_flood,
                    "429 past the compile queue (403 once its quota is full), some 200",
                    " ".join("%dx%d" % (n, s) for s, n in sorted(st.items())),
                    st[200] > 0 and (st[429] > 0 or st[403] > 0) and set(st) <= {200, 403, 429})

        # --- hang-ups mid-generation: the work stops ---
        tok = self.observer
        cancelled0 = self.metrics(tok).get("rm_agent_requests_cancelled_total", 0)
        n_hung = 0
        for stream in (True, True, True, False, False):
            body = {"key": slow_key, "input_ids": [1, 5, 9], "max_new_tokens": HIDDEN_CONTEXT - 8,
                    "ignore_eos": True, "stream": stream}
            self.take("evil")
            if stream:
                s = Stream(self.sock, "/v1/generate", self.evil_token, body, timeout=60)
                for ev in s.events():
                    if ev.get("event") == "token":
                        break
                n_hung += 1
                s.close()
                self.count("evil", Resp(200, {}, b"", 0), "(hung up after a token)")
            else:
                # A plain answer comes whole at the end: hang up before it.
                data = json.dumps(body).encode()
                s = connect(self.sock, 60)
                s.sendall(_head("POST", "/v1/generate", self.evil_token,
                                (("Content-Type", "application/json"),), len(data), False) + data)
                time.sleep(0.5)
                s.shutdown(socket.SHUT_RDWR)
                s.close()
                self.count("evil", Resp(NO_ANSWER, {}, b"", 0), "(hung up)")
        t = time.monotonic()
        while True:
            c = self.metrics(tok).get("rm_agent_requests_cancelled_total", 0)
            if c - cancelled0 >= n_hung or time.monotonic() - t > 5:
                break
            time.sleep(0.1)
        noticed = time.monotonic() - t
        r = self.evil("POST", "/v1/generate", {"key": fast_key, "input_ids": [1, 5, 9], "max_new_tokens": 4})
        # (Each abandoned generation asked for 4 088 tokens, seconds of work.)
        self.attack("5 hang-ups mid-generate (3 after a token)", "work stopped (cancelled >= 3)",
                    "cancelled +%d within %.1f s" % (c - cancelled0, noticed), c - cancelled0 >= n_hung,
                    "next request answered %d in %.2f s" % (r.status, r.elapsed))

        # --- a streamed answer that is no longer read (connection open) ---
        # The hostile's tokenizer makes every token ~4 KiB of text: the whole
        # answer is far more than the socket and the server can buffer, so a
        # generation that finishes while nothing is read was generated into
        # the agent's memory for no one.
        body = {"key": slow_key, "input_ids": [1, 5, 9], "max_new_tokens": a.stall_tokens,
                "ignore_eos": True, "stream": True}
        self.take("evil")
        s = Stream(self.sock, "/v1/generate", self.evil_token, body, timeout=60)
        t_start = s.t0
        for ev in s.events():
            if ev.get("event") == "token":
                break
        time.sleep(a.stall_seconds)
        resumed = time.monotonic() - t_start
        done, n, nbytes = None, 1, 0
        s.s.settimeout(a.request_timeout + 10)
        try:
            for ev in s.events():
                nbytes += len(json.dumps(ev))
                if ev.get("event") == "token":
                    n += 1
                elif ev.get("event") in ("done", "error"):
                    done = ev
        except (OSError, ValueError):
            pass
        s.close()
        r = Resp(200 if done and done.get("event") == "done" else NO_ANSWER, {}, b"", time.monotonic() - t_start)
        self.count("evil", r, "(streamed, left unread)" if r.status else "(stream ended without done)")
        finished_unread = bool(done and done.get("event") == "done" and done.get("elapsed_ms", 1e12) / 1000 < resumed)
        if finished_unread:
            got = "ran to its end unread"
        elif done and done.get("event") == "done":
            got = "paused, finished when read"
        else:
            got = "stopped: %s" % ((done or {}).get("code") or "stream ended")
        self.attack("streamed answer left unread %ds" % a.stall_seconds, "work stops", got, not finished_unread,
                    "%d tokens, %.1f MB generated in %.1f s while the client read nothing (it resumed at %.1f s); "
                    "README Work bounds: stops when 'a streamed answer [is] no longer read'" % (
                        n, nbytes / 1e6, (done or {}).get("elapsed_ms", 0) / 1000, resumed), kind="finding")

        # --- the size of a generate answer ---
        hwm0 = self.proc_status("VmHWM")
        r = self.evil("POST", "/v1/generate", {"key": slow_key, "input_ids": [[1, 5, 9 + i] for i in range(4)],
                                               "max_new_tokens": 1000, "ignore_eos": True}, timeout=120)
        grew = (self.proc_status("VmHWM") - hwm0) / 1024
        self.attack("generate answer of 4x1000 tokens of 4 KiB", "(no bound documented)",
                    "%d, %.1f MB answer" % (r.status, len(r.body) / 1e6), False,
                    "agent peak RSS +%.0f MiB; nothing bounds prompts x max_new_tokens x token text "
                    "(64 x 4088 such tokens: ~1 GiB answer)" % grew, r.elapsed, kind="info")

        # --- flooding generates until the end ---
        flood_end = self.t_end - 3
        if time.monotonic() + 5 > flood_end:
            self.attack("flood of generates", "429 past its share", "no time left (raise --seconds)", False)
            return
        statuses = Counter()

        def flooder():
            while time.monotonic() < flood_end and not self.stop.is_set():
                r = self.evil("POST", "/v1/generate", {"key": fast_key, "input_ids": [1, 5, 9],
                                                       "max_new_tokens": a.flood_tokens, "ignore_eos": True})
                with self.lock:
                    statuses[r.status] += 1
                if r.status != 200:
                    time.sleep(0.02)  # ignores Retry-After, but lets the client breathe
        self.flood_window = (time.monotonic(), flood_end)
        ths = [threading.Thread(target=flooder) for _ in range(a.flood_threads)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        self.flood_window = (self.flood_window[0], time.monotonic())
        self.flood_statuses = statuses
        self.attack("flood: %d threads of generates" % a.flood_threads, "429 past its share, rest 200",
                    " ".join("%dx%d" % (n, s) for s, n in sorted(statuses.items())),
                    statuses[429] > 0 and statuses[200] > 0 and set(statuses) <= {200, 429})

    def upload_declared(self, size):
        """Content-Length above the limit, no body sent: refused at once."""
        data = b""
        self.take("evil")
        t = time.monotonic()
        s = connect(self.sock, 30)
        sha = hashlib.sha256(os.urandom(8)).hexdigest()
        s.sendall(_head("PUT", "/v1/blobs/" + sha, self.evil_token, (), size, False) + data)
        raw = read_all(s)
        s.close()
        r = parse_answer(raw, time.monotonic() - t)
        self.count("evil", r)
        return r

    def declared_json(self, size, send):
        """A JSON body declared `size` bytes long, of which `send` are sent."""
        self.take("evil")
        t = time.monotonic()
        s = connect(self.sock, 30)
        s.sendall(_head("POST", "/v1/models", self.evil_token, (("Content-Type", "application/json"),), size, False))
        block = b" " * (64 << 10)
        try:
            for _ in range(send // len(block)):
                s.sendall(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = read_all(s)
        s.close()
        r = parse_answer(raw, time.monotonic() - t)
        self.count("evil", r)
        return r

    def upload_chunked(self, size, data=None, cut=False, sha=None):
        """A chunked upload (no Content-Length) of `size` bytes; `cut`: send
        `data` and hang up."""
        self.take("evil")
        sha = sha or hashlib.sha256(os.urandom(8)).hexdigest()
        t = time.monotonic()
        s = connect(self.sock, 30)
        s.sendall(_head("PUT", "/v1/blobs/" + sha, self.evil_token, (), None, True))
        block = os.urandom(64 << 10)
        sent = 0
        try:
            if cut:
                for i in range(0, len(data), 64 << 10):
                    part = data[i:i + (64 << 10)]
                    s.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
                s.shutdown(socket.SHUT_RDWR)
                s.close()
                r = Resp(NO_ANSWER, {}, b"", time.monotonic() - t)
                self.count("evil", r, "(hung up)")
                return r
            while sent < size:
                s.sendall(b"%x\r\n" % len(block) + block + b"\r\n")
                sent += len(block)
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = read_all(s)
        s.close()
        r = parse_answer(raw, time.monotonic() - t)
        self.count("evil", r)
        return r

    # -- integrity ---------------------------------------------------------------

    def check_cache(self):
        """Recomputes what the cache on disk claims. Returns a dict of counts
        and the list of mismatches."""
        bad, stray = [], []
        res = {"blobs": 0, "entries": 0, "entry_files": 0, "models": 0}
        hexname = re.compile(r"^[0-9a-f]{64}$")
        bdir = os.path.join(self.cache, "blobs")
        for n in sorted(os.listdir(bdir)) if os.path.isdir(bdir) else []:
            p = os.path.join(bdir, n)
            if not hexname.match(n):
                stray.append("blobs/" + n)
                continue
            res["blobs"] += 1
            if file_sha256(p) != n:
                bad.append("blob %s: content hashes to %s" % (n, file_sha256(p)))
        edir = os.path.join(self.cache, "entries")
        for k in sorted(os.listdir(edir)) if os.path.isdir(edir) else []:
            d = os.path.join(edir, k)
            res["entries"] += 1
            try:
                with open(os.path.join(d, "entry.json")) as f:
                    meta = json.load(f)
            except (OSError, ValueError) as e:
                bad.append("entry %s: entry.json unreadable: %s" % (k, e))
                continue
            if meta.get("key") != k:
                bad.append("entry %s: entry.json names key %s" % (k, meta.get("key")))
            derived = derive_key(meta.get("inputs", {}))
            if derived != k:
                bad.append("entry %s: its inputs give key %s" % (k, derived))
            listed = set()
            for fs in meta.get("files", []):
                res["entry_files"] += 1
                listed.add(fs["path"])
                p = os.path.join(d, fs["path"])
                if not os.path.isfile(p):
                    bad.append("entry %s: %s missing" % (k, fs["path"]))
                    continue
                size, sha = os.path.getsize(p), file_sha256(p)
                if size != fs["size"] or sha != fs["sha256"]:
                    bad.append("entry %s: %s is %d bytes sha256 %s, entry.json says %d %s" % (
                        k, fs["path"], size, sha, fs["size"], fs["sha256"]))
            for root, _, names in os.walk(d):
                for n in names:
                    rel = os.path.relpath(os.path.join(root, n), d)
                    if rel not in listed and rel not in ("entry.json", ".last_used"):
                        bad.append("entry %s: file %s not in entry.json" % (k, rel))
        mdir = os.path.join(self.cache, "models")
        for dg in sorted(os.listdir(mdir)) if os.path.isdir(mdir) else []:
            if not hexname.match(dg):
                stray.append("models/" + dg)
                continue
            res["models"] += 1
            got = model_digest(os.path.join(mdir, dg))
            if got != "sha256:" + dg:
                bad.append("model %s: its files give digest %s" % (dg, got))
        tdir = os.path.join(self.cache, "tmp")
        if os.path.isdir(tdir):
            stray += ["tmp/" + n for n in os.listdir(tdir)]
        res["bad"], res["stray"] = bad, stray
        return res

    # -- report ------------------------------------------------------------------

    def report(self, setup_s, load_s, stuck, m, rss_now, hwm, stop_rc, stop_s, integ):
        a = self.args
        out = []
        p = out.append
        p("")
        p("rm-agent soak: %d well-behaved tenants x %d pods%s + 1 hostile, %d s of load (%.0f s setup), "
          "%d requests (cap %d)" % (a.tenants, a.pods,
                                    " + 1 tenant serving %s" % os.path.basename(a.gguf) if a.gguf else "",
                                    a.seconds, setup_s, self.requests, a.max_requests))
        p("machine: %d CPUs, load average %.2f at the end; agent: %s%s" % (
            os.cpu_count(), os.getloadavg()[0], " ".join(self.agent_cmd[1:]).replace(self.tmp, "$TMP"),
            "; env " + " ".join(a.agent_env) if a.agent_env else ""))
        if self.t_ready:
            p("every pod had uploaded and prepared its model %.1f s into the load; the hostile came at %.0f s" % (
                self.t_ready - self.t0, self.t_phase2 - self.t0))
        p("")
        p("== requests by answer ==")
        p("%-8s %-7s %-26s %8s" % ("who", "status", "code", "count"))
        for (role, st, code), n in sorted(self.counts.items(), key=lambda x: (x[0][0] != "good", x[0][1], x[0][2])):
            p("%-8s %-7s %-26s %8d" % ({"good": "tenants", "evil": "hostile"}[role],
                                       st if st else "-", code or ("served" if st < 300 else ""), n))
        served = sum(n for (r, st, _), n in self.counts.items() if 200 <= st < 300)
        refused = sum(n for (r, st, _), n in self.counts.items() if st >= 400)
        p("served (2xx) %d, refused (4xx/5xx) %d, no answer (hang-ups) %d" % (
            served, refused, sum(n for (r, st, _), n in self.counts.items() if st == 0)))
        p("")
        p("== well-behaved tenants' generate latency (whole answer, retries included) ==")
        p("%-36s %6s %9s %9s %9s" % ("window", "n", "p50 ms", "p99 ms", "max ms"))
        fw = self.flood_window
        ready = self.t_ready or self.t_phase2
        rows = [("start: pods uploading, compiling", lambda s, e: s < ready),
                ("phase 1: no hostile", lambda s, e: ready <= s < self.t_phase2),
                ("phase 2: hostile present", lambda s, e: s >= self.t_phase2)]
        if fw:
            rows.append(("phase 2, during its generate flood", lambda s, e: s >= fw[0] and e <= fw[1]))
        lat = {}
        for name, f in rows:
            v = [x[2] for x in self.lat if f(x[0], x[1])]
            lat[name] = v
            p("%-36s %6d %9.1f %9.1f %9.1f" % (name, len(v), pct(v, 50) * 1000, pct(v, 99) * 1000,
                                                (max(v) if v else float("nan")) * 1000))
        base, fl = lat.get("phase 1: no hostile"), lat.get("phase 2, during its generate flood")
        if base and fl:
            # A finding, not a check: as shipped, llama.cpp's OpenMP threads
            # spin-wait between tokens, and on a busy 2-vCPU node a 32-token
            # request then takes seconds at random, the flood's as well as
            # anyone's (steady with --agent-env OMP_WAIT_POLICY=passive).
            self.attack("flood: well-behaved p99 meanwhile", "<= 3 x phase-1 p99 + 250 ms",
                        "%.0f ms (phase 1: %.0f ms)" % (pct(fl, 99) * 1000, pct(base, 99) * 1000),
                        pct(fl, 99) <= 3 * pct(base, 99) + 0.25,
                        "" if pct(fl, 99) <= 3 * pct(base, 99) + 0.25 else
                        "llama.cpp's OpenMP spin-wait (see agent/README.md, Soak)", kind="finding")
        if a.gguf:
            for name, f in rows[1:3]:
                v = [x[2] for x in self.lat if f(x[0], x[1]) and "soak-gguf" in x[3]]
                p("%-36s %6d %9.1f %9.1f %9.1f" % ("  of which SmolLM2, " + name.split(":")[0], len(v),
                                                    pct(v, 50) * 1000, pct(v, 99) * 1000,
                                                    (max(v) if v else float("nan")) * 1000))
        for name, f in rows[1:3]:
            v = [x[1] for x in self.health if f(x[0], x[0])]
            p("%-36s %6d %9.1f %9.1f %9.1f" % ("GET /healthz, " + name.split(":")[0], len(v), pct(v, 50) * 1000,
                                                pct(v, 99) * 1000, (max(v) if v else float("nan")) * 1000))
        if a.verbose:
            p("slowest generates:")
            for ts, te, d, what in sorted(self.lat, key=lambda x: -x[2])[:8]:
                p("  %7.0f ms at %5.1f s: %s" % (d * 1000, ts - self.t0, what))
            p("slowest /healthz:")
            for t, d, ok in sorted(self.health, key=lambda x: -x[1])[:5]:
                p("  %7.0f ms at %5.1f s" % (d * 1000, t - self.t0))
        p("")
        p("== events ==")
        for k, n in sorted(self.events.items()):
            p("%-52s %6d" % (k, n))
        for k in ("rm_agent_generate_requests_total", "rm_agent_generated_tokens_total",
                  "rm_agent_requests_cancelled_total", "rm_agent_refused_busy_total",
                  "rm_agent_refused_requests_total", "rm_agent_request_timeouts_total",
                  "rm_agent_compiles_started_total", "rm_agent_compiles_failed_total",
                  "rm_agent_cache_evictions", "rm_agent_cache_entries", "rm_agent_cache_bytes"):
            if k in m:
                p("%-52s %6d" % ("agent " + k, m[k]))
        p("")
        p("== agent memory ==")
        p("RSS peak (VmHWM) %.1f MiB, sampled max %.1f MiB, at the end %.1f MiB" % (
            hwm / 1024, self.rss_max_kib / 1024, rss_now / 1024))
        p("CPU time: agent %.0f s, this client %.0f s, over %.0f s of load" % (self.cpu_agent, self.cpu_client, load_s))
        loads = Counter()
        try:
            with open(os.path.join(self.tmp, "agent.log"), errors="replace") as f:
                for line in f:
                    mm = re.search(r'model loaded key=(\w+) engine="([^"]+)"', line)
                    if mm:
                        loads[mm.group(2)] += 1
                        loads["keys:" + mm.group(1)] += 1
        except OSError:
            pass
        n_keys = len([k for k in loads if k.startswith("keys:")])
        if n_keys:
            p("models loaded by the cpu backend: %d times (%s), %d distinct entries; it keeps 4 loaded, "
              "and loads inside the CPU slot" % (sum(v for k, v in loads.items() if not k.startswith("keys:")),
                                                 ", ".join("%s %d" % (k, v) for k, v in sorted(loads.items())
                                                           if not k.startswith("keys:")), n_keys))
        p("")
        p("== hostile tenant: attacks ==")
        p("%-45s %-30s %-34s %s" % ("attack", "expected", "got", "ok"))
        for name, exp, got, verdict, note in self.attacks:
            p("%-45s %-30s %-34s %s%s" % (name, exp, got, verdict, ("  " + note) if note else ""))
        p("")
        p("== cache integrity (recomputed on disk after the agent stopped) ==")
        p("blobs %d, entries %d (%d files), assembled models %d: mismatches %d, stray files %d" % (
            integ["blobs"], integ["entries"], integ["entry_files"], integ["models"], len(integ["bad"]),
            len(integ["stray"])))
        for b in integ["bad"] + ["stray: " + s for s in integ["stray"]]:
            p("  " + b)
        p("")
        failures = []
        failures += ["attack %r: expected %s, got %s" % (n, e, g) for n, e, g, v, _ in self.attacks
                     if v == "UNEXPECTED" or (v == "FINDING" and a.strict)]
        findings = [(n, e, g, note) for n, e, g, v, note in self.attacks if v == "FINDING"]
        failures += ["well-behaved: " + u for u in self.unexpected[:20]]
        if len(self.unexpected) > 20:
            failures.append("well-behaved: ... %d more" % (len(self.unexpected) - 20))
        failures += ["isolation: " + s for s in self.isolation]
        if self.agent_died:
            failures.append("the agent died: " + self.agent_died)
        if stop_rc not in (0, None):
            failures.append("the agent's SIGTERM stop: %s" % stop_rc)
        if stuck:
            failures.append("threads still running after the end: %s" % ", ".join(stuck))
        if integ["bad"] or integ["stray"]:
            failures.append("cache integrity: %d mismatches, %d stray files" % (len(integ["bad"]), len(integ["stray"])))
        if not lat.get("phase 1: no hostile"):
            failures.append("no well-behaved generate completed in phase 1")
        p("agent stopped on SIGTERM in %s s with %s; load ran %.0f s" % (
            "%.1f" % stop_s if stop_s is not None else "-", stop_rc, load_s))
        if failures:
            p("SOAK FAILED:")
            for f in failures:
                p("  - " + f)
            p("agent log (last lines):")
            p(self.agent_log_tail(20))
            p("kept: " + self.tmp)
        else:
            p("SOAK PASSED" + (" (with %d finding(s): known agent bugs, reported above; --strict fails on them)"
                               % len(findings) if findings else ""))
        print("\n".join(out), flush=True)
        if not failures and not a.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return 1 if failures else 0


def derive_key(inputs):
    """The agent's CacheKey::derive: SHA-256 of a tag and the length-prefixed
    inputs, options in their canonical (serde, compact) form."""
    h = hashlib.sha256(b"rm-agent cache key v1\n")
    opts = json.dumps(inputs.get("options", {}), separators=(",", ":"), ensure_ascii=False)
    for part in (inputs.get("model_digest", ""), inputs.get("backend", ""), inputs.get("compiler_version", ""),
                 inputs.get("device_type", ""), opts):
        b = str(part).encode()
        h.update(struct.pack("<Q", len(b)))
        h.update(b)
    return h.hexdigest()


def model_digest(d):
    """The agent's model digest of a directory: sha256 over sorted
    (relative path, file sha256) pairs of the files it reads."""
    files = []
    for root, dirs, names in os.walk(d):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        for n in names:
            if n.startswith("."):
                continue
            files.append(os.path.relpath(os.path.join(root, n), d))
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        files = [f for f in files if not f.endswith((".bin", ".gguf", ".pt"))]
        pairs = [(f, file_sha256(os.path.join(d, f))) for f in files]
    else:
        ggufs = [f for f in files if f.endswith(".gguf")]
        if len(ggufs) != 1:
            return "(not a model: %s)" % files
        pairs = [("model.gguf", file_sha256(os.path.join(d, ggufs[0])))]
    h = hashlib.sha256()
    for p, s in sorted(pairs):
        h.update(p.encode() + b"\0" + s.encode() + b"\n")
    return "sha256:" + h.hexdigest()


def size_arg(s):
    m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper()
    return int(s[:-1]) * m[s[-1]] if s and s[-1] in m else int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agent", required=True, help="the rm-agent binary")
    ap.add_argument("--seconds", type=int, default=120,
                    help="load duration, at least 90 (setup and checks come on top)")
    ap.add_argument("--max-requests", type=int, default=60000, help="stop the load after this many requests")
    ap.add_argument("--tenants", type=int, default=8, help="well-behaved namespaces (at least 3)")
    ap.add_argument("--pods", type=int, default=2, help="pods (threads) per well-behaved namespace")
    ap.add_argument("--gguf", help="a GGUF file one more tenant serves by node path (e.g. SmolLM2-135M)")
    ap.add_argument("--phase1", type=float, default=0.3, help="share of --seconds before the hostile arrives")
    ap.add_argument("--think", type=float, default=0.25, help="longest pause of a pod between requests (s)")
    ap.add_argument("--max-queued-per-namespace", type=int, default=4)
    ap.add_argument("--max-queued", type=int, default=32)
    ap.add_argument("--max-queued-compiles", type=int, default=2)
    ap.add_argument("--request-timeout", type=int, default=30)
    ap.add_argument("--max-upload", type=size_arg, default="8M")
    ap.add_argument("--namespace-quota", type=size_arg, default="12M")
    ap.add_argument("--cache-max-bytes", type=size_arg, default="64M", help="(plus the GGUF's size)")
    ap.add_argument("--compile-flood", type=int, default=12, help="concurrent prepares of the hostile")
    ap.add_argument("--flood-threads", type=int, default=8)
    ap.add_argument("--flood-tokens", type=int, default=32)
    ap.add_argument("--stall-tokens", type=int, default=2500)
    ap.add_argument("--token-text", type=int, default=4096,
                    help="characters of text per token of the hostile's own tokenizer")
    ap.add_argument("--stall-seconds", type=int, default=8)
    ap.add_argument("--agent-env", action="append", default=[], metavar="K=V",
                    help="environment for the agent (e.g. OMP_WAIT_POLICY=passive); repeatable")
    ap.add_argument("--strict", action="store_true", help="fail on findings (known agent bugs) too")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("-v", "--verbose", action="store_true", help="log attacks as they run")
    args = ap.parse_args()
    if args.tenants < 3:
        ap.error("--tenants must be at least 3")
    if args.seconds * (1 - args.phase1) < 60:
        ap.error("the hostile needs 60 s after --phase1 (its attacks take 20-40 s, then it floods): "
                 "raise --seconds (at least 90 with --phase1 0.3)")
    try:
        soak = Soak(args)
    except OSError as e:
        print("soak: %s" % e, file=sys.stderr)
        return 2
    try:
        return soak.run()
    finally:
        if soak.agent and soak.agent.poll() is None:
            soak.agent.kill()


if __name__ == "__main__":
    sys.exit(main())
