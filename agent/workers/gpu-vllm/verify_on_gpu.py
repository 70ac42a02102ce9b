#!/usr/bin/env python3
"""Checks the GPU worker on a machine with an NVIDIA GPU: builds a tiny
random llama with transformers, drives worker.py through the rm-agent worker
protocol (hello, compile, generate) and compares its greedy tokens with
transformers run directly on CUDA. Exit 0 when they match; 2 when the
machine lacks torch/transformers (nothing verified)."""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError as e:
    print("SKIP: %s" % e)
    sys.exit(2)

print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())
try:
    import vllm
    print("vllm", vllm.__version__)
except ImportError:
    print("vllm not installed: the worker uses transformers+torch")
if not torch.cuda.is_available():
    print("SKIP: no CUDA device")
    sys.exit(2)

tmp = tempfile.mkdtemp()
model_dir = os.path.join(tmp, "tiny")
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2)
LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
prompt = [1, 17, 42, 99, 3]

ref = LlamaForCausalLM.from_pretrained(model_dir).to("cuda").eval()
with torch.no_grad():
    ids = torch.tensor([prompt], device="cuda")
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                       min_new_tokens=12)
want = out[0, len(prompt):].tolist()
del ref

env = dict(os.environ, RM_DEVICES="0", CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
w = subprocess.Popen([sys.executable, os.path.join(HERE, "worker.py")], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, env=env, text=True)


def call(i, method, params):
    w.stdin.write(json.dumps({"id": i, "method": method, "params": params}) + "\n")
    w.stdin.flush()
    while True:
        msg = json.loads(w.stdout.readline())
        if "result" in msg or "error" in msg:
            return msg
        print("  ", msg)


print("hello:", call(1, "hello", {"protocol": 1}))
art = os.path.join(tmp, "artifact")
os.makedirs(art)
print("compile:", call(2, "compile", {"key": "k", "model_path": model_dir, "model_format": "safetensors",
                                      "output_dir": art, "device_type": "gpu", "devices": ["0"],
                                      "options": {"precision": "fp32"}}))
params = {"max_new_tokens": 12, "do_sample": False, "temperature": 1.0, "top_p": None, "top_k": None,
          "seed": 0, "eos_token_ids": [], "stop_at_eos": False}
res = call(3, "generate", {"key": "k", "artifact_dir": art, "devices": ["0"], "prompts": [prompt],
                           "params": params, "stream": True})
print("generate:", res)
got = res.get("result", {}).get("outputs", [{}])[0].get("token_ids")
w.stdin.write(json.dumps({"id": 4, "method": "shutdown", "params": {}}) + "\n")
w.stdin.flush()
w.wait(timeout=60)
print("want", want)
print("got ", got)
if got != want:
    print("FAIL: the GPU worker's greedy tokens differ from transformers on CUDA")
    sys.exit(1)
print("OK: GPU worker verified on", torch.cuda.get_device_name(0))
