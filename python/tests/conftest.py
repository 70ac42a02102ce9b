"""Fixtures: a real rm-agent, a tiny random llama saved as a HuggingFace
directory, an independent raw client of the agent (so that "same tokens as
the agent directly" does not compare rm_abstract with itself), and a runner
for unchanged user scripts in a clean subprocess."""
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PYTHON_DIR = Path(__file__).resolve().parents[1]
REPO = PYTHON_DIR.parent


# -- the agent ----------------------------------------------------------------

def workspace_binary(package, env_var):
    """A binary of the workspace: `env_var` if set (CI passes prebuilt
    ones), else target/debug/<package>, built by cargo when it is there
    (a no-op when up to date; keeps the tests honest after changes)."""
    if os.environ.get(env_var):
        return Path(os.environ[env_var])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    binary = target / "debug" / package
    if shutil.which("cargo"):
        r = subprocess.run(["cargo", "build", "-q", "-p", package], cwd=REPO)
        if r.returncode != 0 and not binary.exists():
            pytest.fail("cargo build -p %s failed" % package)
    if not binary.exists():
        pytest.skip("no %s binary (set %s or install cargo)" % (package, env_var))
    return binary


# The identity of every test pod: an rm-abstract.io/agent slot of a pod in
# namespace "default", written and bound the way the device plugin does.
SLOT_TOKEN = "python-tests-slot-token"


def write_slot_token(state, token, namespace="default"):
    sha = hashlib.sha256(token.encode()).hexdigest()
    rec = {"version": 1, "tokenSha256": sha, "resourceName": "rm-abstract.io/agent",
           "deviceIds": ["agent::" + sha[:8]], "devices": [], "createdUnixMs": 0, "agentSlot": True,
           "owner": {"namespace": namespace, "pod": namespace + "-pod"}}
    tmp = Path(state) / "tokens" / (".%s.tmp" % sha)
    tmp.write_text(json.dumps(rec))
    tmp.rename(Path(state) / "tokens" / (sha + ".json"))


class Agent:
    def __init__(self, binary, root, model_roots=(), extra_args=()):
        self.binary, self.root = binary, Path(root)
        self.socket = self.root / "run" / "agent.sock"
        self.cache = self.root / "cache"
        self.state = self.root / "state"
        (self.state / "tokens").mkdir(parents=True, exist_ok=True)
        write_slot_token(self.state, SLOT_TOKEN)
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.root / "agent.log", "wb")
        # The node's transformers worker (models the built-in cpu backend
        # lacks, e.g. GPT-2), run by this test's Python: available in the
        # torch pass, reported unavailable in the torch-free one.
        plugins = self.root / "plugins"
        plugins.mkdir(exist_ok=True)
        for w in ("cpu-transformers", "common"):
            (plugins / w).symlink_to(REPO / "agent" / "workers" / w)
        self.proc = subprocess.Popen(
            [str(binary), "--socket", str(self.socket), "--cache-dir", str(self.cache), "--state-dir", str(self.state),
             "--plugin-dir", str(plugins), "--worker-python", sys.executable,
             # the node default (10G free) would make the result depend on
             # this machine's disk; the tests write a few MB
             "--min-free-disk", "64M"]
            # node paths the direct_* helpers register: the tests' models only
            + ["--model-path-allow=%s" % r for r in model_roots] + list(extra_args),
            stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ, RM_LOG="warn"))
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.socket.exists():
                try:
                    self.call("GET", "/healthz")
                    return
                except OSError:
                    pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("rm-agent did not start; log: %s" % (self.root / "agent.log").read_text())

    def call(self, method, path, body=None, token=SLOT_TOKEN):
        """Raw HTTP over the unix socket, as the test pod (token=None: none);
        returns (status, decoded body or text)."""
        class Conn(http.client.HTTPConnection):
            def connect(c):
                c.sock = socket.socket(socket.AF_UNIX)
                c.sock.connect(str(self.socket))
        c = Conn("rm-agent", timeout=300)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = "Bearer " + token
        c.request(method, path, json.dumps(body) if body is not None else None, headers)
        r = c.getresponse()
        data = r.read()
        c.close()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data.decode()

    def direct_generate(self, source_path, input_ids, max_new_tokens, **extra):
        """What the agent produces without rm_abstract: register by path, prepare, generate."""
        st, reg = self.call("POST", "/v1/models", {"source": {"path": str(source_path)}})
        assert st == 200, reg
        st, prep = self.call("POST", "/v1/prepare", {"model": reg["model"], "device": "cpu"})
        assert st == 200, prep
        body = dict({"key": prep["key"], "device": "cpu", "input_ids": input_ids,
                     "max_new_tokens": max_new_tokens}, **extra)
        st, out = self.call("POST", "/v1/generate", body)
        assert st == 200, out
        return [o["token_ids"] for o in out["outputs"]]

    def direct_forward(self, source_path, input_ids, logits_to_keep=0):
        """The agent's logits without rm_abstract, as numpy arrays per sequence."""
        import base64
        import numpy as np
        st, reg = self.call("POST", "/v1/models", {"source": {"path": str(source_path)}})
        assert st == 200, reg
        st, prep = self.call("POST", "/v1/prepare", {"model": reg["model"], "device": "cpu"})
        assert st == 200, prep
        st, out = self.call("POST", "/v1/forward", {"key": prep["key"], "device": "cpu", "input_ids": input_ids,
                                                    "logits_to_keep": logits_to_keep})
        assert st == 200, out
        return [np.frombuffer(base64.b64decode(o["logits"]), "<f4").reshape(o["positions"], o["vocab_size"])
                for o in out["outputs"]]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def agent(tmp_path_factory):
    # short root: unix socket paths are limited to ~107 bytes
    root = Path(os.environ.get("RM_TEST_TMP", "/tmp")) / ("rmpy-%d" % os.getpid())
    shutil.rmtree(root, ignore_errors=True)
    smollm2_cache = os.environ.get("RM_SMOLLM2_CACHE", str(Path.home() / ".cache" / "rm-abstract" / "smollm2"))
    a = Agent(workspace_binary("rm-agent", "RM_AGENT_BIN"), root, [tmp_path_factory.getbasetemp(), smollm2_cache])
    # In-process rm_abstract.init() reads the pod's env: be that test pod.
    os.environ["RM_AGENT_SLOT_TOKEN"] = SLOT_TOKEN
    yield a
    os.environ.pop("RM_AGENT_SLOT_TOKEN", None)
    a.stop()
    shutil.rmtree(root, ignore_errors=True)


# -- a tiny random llama as a HuggingFace directory ----------------------------

TINY_VOCAB = 256
_CORPUS = ("Hello world. The capital of France is Paris. The quick brown fox jumps over the lazy dog. "
           "Models run on GPUs and NPUs; hello again, world! ") * 20


def make_tiny_llama(d, seed=7):
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    hidden, inter, layers, heads, kv = 64, 128, 2, 4, 2
    hd = hidden // heads
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "vocab_size": TINY_VOCAB, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": 256, "bos_token_id": 1,
           "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32"}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.3):
        return (rng.uniform(-1, 1, size=shape) * scale).astype(np.float32)

    def ones(n):
        return (1.0 + rng.uniform(-0.1, 0.1, size=(n,))).astype(np.float32)
    t = {"model.embed_tokens.weight": w(TINY_VOCAB, hidden, scale=1.0), "model.norm.weight": ones(hidden),
         "lm_head.weight": w(TINY_VOCAB, hidden)}
    for i in range(layers):
        p = "model.layers.%d." % i
        t.update({p + "input_layernorm.weight": ones(hidden), p + "post_attention_layernorm.weight": ones(hidden),
                  p + "self_attn.q_proj.weight": w(heads * hd, hidden), p + "self_attn.k_proj.weight": w(kv * hd, hidden),
                  p + "self_attn.v_proj.weight": w(kv * hd, hidden), p + "self_attn.o_proj.weight": w(hidden, heads * hd),
                  p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                  p + "mlp.down_proj.weight": w(hidden, inter)})
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})

    # A byte-level BPE trained to exactly the model's vocabulary size, with
    # <unk>/<s>/</s> at 0/1/2 to match the config's bos/eos ids.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # (no initial alphabet: only the corpus' characters, so it stays small)
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer)
    assert tok.get_vocab_size() <= TINY_VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(d))
    return d


def numpy_llama_logits(d, ids):
    """The tiny llama's logits for every position of `ids`, computed here in
    float64 numpy from the safetensors (HF layout and rope): a reference that
    shares no code with the agent."""
    import numpy as np
    from safetensors.numpy import load_file
    cfg = json.loads((Path(d) / "config.json").read_text())
    t = {k: v.astype(np.float64) for k, v in load_file(str(Path(d) / "model.safetensors")).items()}
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, n = hidden // heads, cfg["rms_norm_eps"], len(ids)
    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    ang = np.outer(np.arange(n), inv)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # (heads, n, hd), rotate_half as in transformers
        return x * cos + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    x = t["model.embed_tokens.weight"][ids]
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % i
        h = rms(x, t[p + "input_layernorm.weight"])
        q = (h @ t[p + "self_attn.q_proj.weight"].T).reshape(n, heads, hd).transpose(1, 0, 2)
        k = (h @ t[p + "self_attn.k_proj.weight"].T).reshape(n, kv, hd).transpose(1, 0, 2)
        v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(n, kv, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, heads // kv, axis=0), np.repeat(v, heads // kv, axis=0)
        a = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + causal
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(1, 0, 2).reshape(n, hidden)
        x = x + o @ t[p + "self_attn.o_proj.weight"].T
        h = rms(x, t[p + "post_attention_layernorm.weight"])
        g = h @ t[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    return rms(x, t["model.norm.weight"]) @ t["lm_head.weight"].T


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


# -- running unchanged scripts ---------------------------------------------------

def injected_env(agent, **extra):
    """Exactly what the webhook injects, plus PYTHONPATH; nothing from this process."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
           "PYTHONPATH": str(PYTHON_DIR), "RM_INJECTED": "1", "RM_DEVICE": "cpu",
           "RM_AGENT_SOCKET": str(agent.socket) if agent else "/nonexistent/agent.sock",
           "RM_AGENT_SLOT_TOKEN": SLOT_TOKEN, "RM_POD_NAME": "test-pod", "RM_POD_NAMESPACE": "default", "RM_POD_UID": "0000",
           "HF_HUB_OFFLINE": "1"}  # the tests never need the network
    env.update({k: v for k, v in extra.items() if v is not None})
    for k in [k for k, v in extra.items() if v is None]:
        env.pop(k, None)
    return env


def run_script(tmp_path, code, env, python=sys.executable, args=(), timeout=300):
    script = Path(tmp_path) / "script.py"
    script.write_text(code)
    return subprocess.run([python, str(script), *map(str, args)], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def rm_lines(stderr):
    return [l for l in stderr.splitlines() if l.startswith("rm_abstract:")]


# -- what the agent did ------------------------------------------------------------

def agent_counters(agent):
    """The agent's request counters (its /metrics), summed over labels: the
    proof that the agent, not the test's process, served a request."""
    st, text = agent.call("GET", "/metrics")
    assert st == 200, text
    out = {}
    for line in text.splitlines():
        if line.startswith("rm_agent_") and " " in line:
            name, value = line.rsplit(" ", 1)
            name = name.split("{")[0]
            out[name] = out.get(name, 0) + float(value)
    return out


def served(before, after, name="rm_agent_generate_requests_total"):
    return after.get(name, 0) - before.get(name, 0)


# -- a tiny random GPT-2 (an architecture the built-in cpu backend lacks) ----------

def make_tiny_gpt2(d, tokenizer_from, seed=3):
    """Written by the real transformers (needs torch): GPT2LMHeadModel with
    random weights, the tiny llama's tokenizer, eos = </s>."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    d = Path(d)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_from))
    cfg = GPT2Config(vocab_size=TINY_VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(cfg).eval().save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    return d


def transformers_itself(monkeypatch):
    """Lets transformers' own from_pretrained run in this process (the
    reference the agent is compared with), whatever init() a test did."""
    import rm_abstract
    monkeypatch.setattr(rm_abstract._state, "active", False)
