"""The cpu-transformers worker (agent/workers/cpu-transformers) over the
worker protocol, with the real torch and transformers: a cancel stops a
generation at its next token, streamed or not, and the process serves the
next request; precisions map to dtypes; what it cannot run is refused at
compile.

Needs a Python with torch and transformers, named by RM_TORCH_PYTHON (the
worker runs under it); skipped, saying so, without one.

Run: RM_TORCH_PYTHON=/path/to/python python3 -m pytest -q agent/tests/workers
"""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from worker_process import WorkerProcess

WORKER = Path(__file__).resolve().parents[2] / "workers" / "cpu-transformers" / "worker.py"
PY = os.environ.get("RM_TORCH_PYTHON")

pytestmark = pytest.mark.skipif(not PY, reason="RM_TORCH_PYTHON names no Python with torch and transformers")

GPT2 = r'''
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=4096,
                           bos_token_id=127, eos_token_id=127)).save_pretrained(sys.argv[1])
'''


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    subprocess.run([PY, "-c", GPT2, str(d)], check=True, capture_output=True, timeout=300)
    return d


class Worker(WorkerProcess):
    def __init__(self):
        super().__init__([PY, str(WORKER)], cwd=WORKER.parent, env={"RM_CPU_THREADS": "1"}, timeout=120,
                         stderr=subprocess.DEVNULL)


def compile_params(model, out, **options):
    out.mkdir(exist_ok=True)
    return {"key": "k", "model_path": str(model), "model_format": "safetensors", "output_dir": str(out),
            "device_type": "cpu", "devices": [], "options": options}


def generate_params(art, n, stream):
    return {"key": "k", "artifact_dir": str(art), "devices": [], "prompts": [[1, 2, 3]], "stream": stream,
            "params": {"max_new_tokens": n, "do_sample": False, "temperature": 1.0, "top_p": None, "top_k": None,
                       "seed": 0, "eos_token_ids": [], "stop_at_eos": False}}


def test_a_cancel_stops_generation_at_the_next_token_and_the_process_goes_on(gpt2, tmp_path):
    w = Worker()
    art = tmp_path / "art"
    w.send(1, "compile", compile_params(gpt2, art))
    assert "result" in w.final(1)
    assert json.loads((art / "artifact.json").read_text())["dtype"] == "float32"
    # Streamed: tokens arrive while generating; a cancel ends it.
    w.send(2, "generate", generate_params(art, 4000, True))
    for _ in range(3):
        assert "token" in w.next()
    t = time.monotonic()
    w.send(3, "cancel", {"id": 2})
    assert w.final(2)["error"]["kind"] == "cancelled"
    assert time.monotonic() - t < 5
    # Not streamed: the stopping criterion sees the cancel.
    w.send(4, "generate", generate_params(art, 4000, False))
    time.sleep(1.0)
    t = time.monotonic()
    w.send(5, "cancel", {"id": 4})
    assert w.final(4)["error"]["kind"] == "cancelled"
    assert time.monotonic() - t < 5
    # The same process, model loaded, serves the next one whole.
    w.send(6, "generate", generate_params(art, 5, False))
    out = w.final(6)["result"]["outputs"][0]
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"
    w.close()


@pytest.mark.parametrize("precision, dtype", [(None, "float32"), ("fp32", "float32"), ("bf16", "bfloat16"),
                                              ("fp16", "float16")])
def test_precisions_map_to_dtypes(gpt2, tmp_path, precision, dtype):
    w = Worker()
    art = tmp_path / "art"
    opts = {"precision": precision} if precision else {}
    w.send(1, "compile", compile_params(gpt2, art, **opts))
    assert "result" in w.final(1)
    assert json.loads((art / "artifact.json").read_text())["dtype"] == dtype
    w.send(2, "generate", generate_params(art, 3, False))
    assert len(w.final(2)["result"]["outputs"][0]["token_ids"]) == 3
    w.close()


def test_what_it_cannot_run_is_refused_at_compile(gpt2, tmp_path):
    w = Worker()
    w.send(1, "compile", compile_params(gpt2, tmp_path / "a", precision="q4_0"))
    err = w.final(1)["error"]
    assert err["kind"] == "invalid_request" and "none, fp32, bf16, fp16" in err["message"], err
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    (odd / "model.safetensors").write_bytes(b"")
    w.send(2, "compile", compile_params(odd, tmp_path / "b"))
    err = w.final(2)["error"]
    assert err["kind"] == "unsupported" and "no-such-architecture" in err["message"], err
    (odd / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (odd / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    w.send(3, "compile", compile_params(odd, tmp_path / "c"))
    err = w.final(3)["error"]
    assert err["kind"] == "unsupported" and "model.safetensors" in err["message"], err
    w.close()
