#!/usr/bin/env python3
"""End-to-end check on a GPU machine: rm-agent (binary given as argv[1]) with
the shipped workers in --plugin-dir, a device-plugin style token for GPU 0,
and a stdlib-only HTTP client on the unix socket: prepare + generate on
gpu:0 must give transformers' greedy tokens. Exit 0 on match."""
import http.client
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("rm-agent", timeout=600)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def call(sock, method, path, body=None, token=None):
    c = UnixHTTPConnection(sock)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    c.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = c.getresponse()
    data = r.read()
    return r.status, json.loads(data) if data else None


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
    want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                        min_new_tokens=12)[0, len(prompt):].tolist()
del ref

state = os.path.join(tmp, "state")
os.makedirs(os.path.join(state, "tokens"))
token = "gpu-token-123"
with open(os.path.join(state, "tokens", hashlib.sha256(token.encode()).hexdigest() + ".json"), "w") as f:
    json.dump({"version": 1, "tokenSha256": hashlib.sha256(token.encode()).hexdigest(),
               "resourceName": "nvidia.com/gpu", "deviceIds": ["gpu-0"], "createdUnixMs": 0,
               "devices": [{"id": "gpu-0", "deviceType": "gpu", "index": 0, "pciAddress": None, "nodes": []}],
               "owner": {"namespace": "default", "pod": "verify"}}, f)
sock = os.path.join(tmp, "agent.sock")
agent = subprocess.Popen([sys.argv[1], "--socket", sock, "--cache-dir", os.path.join(tmp, "cache"),
                          "--state-dir", state, "--plugin-dir", os.path.dirname(HERE)])
try:
    for _ in range(600):
        if os.path.exists(sock):
            break
        time.sleep(0.1)
    st, backends = call(sock, "GET", "/v1/backends", None, token)
    for b in backends["backends"]:
        print("backend", b["name"], "available" if b["available"] else "unavailable: %s" % b["reason"])
    st, p = call(sock, "POST", "/v1/prepare", {"source": {"path": model_dir}, "device": "gpu:0",
                                               "options": {"precision": "fp32"}}, token)
    print("prepare", st, p)
    assert st == 200, p
    st, g = call(sock, "POST", "/v1/generate", {"key": p["key"], "device": "gpu:0", "input_ids": prompt,
                                                "max_new_tokens": 12, "ignore_eos": True}, token)
    print("generate", st, g)
    got = g["outputs"][0]["token_ids"]
    st, refused = call(sock, "POST", "/v1/generate", {"key": p["key"], "device": "gpu:0", "input_ids": prompt})
    print("without token:", st, refused)
    assert st == 401
    print("want", want)
    print("got ", got)
    if got != want:
        print("FAIL")
        sys.exit(1)
    print("OK: rm-agent + gpu-vllm worker (transformers+torch) verified on", torch.cuda.get_device_name(0))
finally:
    agent.terminate()
    agent.wait(timeout=30)
