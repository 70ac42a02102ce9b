#!/usr/bin/env python3
"""rm-agent worker for the CPU: any causal LM that transformers runs, on
torch's CPU kernels (hf_engine, shared with the GPU worker).

It has the built-in cpu backend's priority (0) and is registered after it,
so it serves only the models the built-in one refuses (an architecture
candle and llama.cpp do not run from safetensors, such as GPT-2).

"compile" is a checked copy of the HF model directory into the cache plus
artifact.json recording the dtype: config.json must name a model_type that
this transformers has a causal-LM class for (no repository code is run),
and every safetensors file's header must read. Weights are loaded at the
first generate or forward.

Threads: RM_CPU_THREADS (the agent passes its --cpu-threads) sets
torch.set_num_threads; unset, torch's default.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "common"))
import hf_engine  # noqa: E402
import rm_worker  # noqa: E402
from rm_worker import WorkerError  # noqa: E402

# options.precision -> dtype. fp16 runs, but slowly: most CPUs have no fp16
# arithmetic, and torch converts on each operation.
# Models kept in memory at once, as the built-in cpu backend does.
MAX_LOADED = 4

PRECISIONS = {None: "float32", "none": "float32", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def set_threads():
    raw = os.environ.get("RM_CPU_THREADS", "")
    if not raw:
        return
    try:
        n = int(raw)
    except ValueError:
        rm_worker.log("cpu-transformers: ignoring RM_CPU_THREADS=%r (not a number)" % raw)
        return
    if n > 0:
        import torch
        torch.set_num_threads(n)


def check_model_dir(path):
    """Refuses, before anything is copied, what this worker cannot run:
    no config.json, a model_type transformers has no causal LM for, or
    safetensors files whose headers do not read. Answers the model_type."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise WorkerError("config.json cannot be read: %s" % e, "unsupported")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise WorkerError("config.json names no model_type", "unsupported")
    model_type = cfg["model_type"]
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise WorkerError("model_type %r has no causal-LM class in transformers %s (the worker runs no code from "
                          "the model repository)" % (model_type, transformers.__version__), "unsupported")
    weights = sorted(n for n in os.listdir(path) if n.endswith(".safetensors") and not n.startswith("."))
    if not weights:
        raise WorkerError("the model directory has no .safetensors file", "unsupported")
    from safetensors import safe_open
    for name in weights:
        try:
            with safe_open(os.path.join(path, name), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - any reader failure means a bad file
            raise WorkerError("%s is not a readable safetensors file: %s" % (name, e), "unsupported")
    return model_type


class CpuTransformersWorker(rm_worker.Worker):
    def __init__(self):
        self.loaded = {}
        self.error = hf_engine.missing_packages()
        self.compiler_version = "none" if self.error else hf_engine.versions()
        if self.error is None:
            set_threads()

    def probe(self):
        return (self.error is None), self.error

    def compile(self, params, progress):
        if self.error:
            raise WorkerError(self.error, "unavailable")
        if params["model_format"] != "safetensors":
            raise WorkerError("the cpu-transformers worker takes HF safetensors models, not GGUF", "unsupported")
        opts = params.get("options") or {}
        precision = opts.get("precision")
        if precision not in PRECISIONS:
            raise WorkerError("precision %r is not supported by cpu-transformers; use one of none, fp32, bf16, fp16"
                              % (precision,), "invalid_request")
        if precision == "fp16":
            rm_worker.log("cpu-transformers: fp16 on the CPU is slow (most CPUs have no fp16 arithmetic); "
                          "bf16 or fp32 run faster")
        # The manifest declares no extra options: any key is refused.
        rm_worker.typed_extras(opts.get("extra"), HERE)
        progress(0.05, "check")
        model_type = check_model_dir(params["model_path"])
        progress.raise_if_cancelled()
        progress(0.2, "copy")
        rm_worker.copy_model_files(params["model_path"], params["output_dir"])
        rm_worker.write_artifact_manifest(params["output_dir"], engine="transformers", device="cpu",
                                          dtype=PRECISIONS[precision], model_type=model_type)
        progress(1.0, "done")

    def _load(self, key, artifact_dir):
        if self.error:
            raise WorkerError(self.error, "unavailable")
        if key not in self.loaded:
            while len(self.loaded) >= MAX_LOADED:
                # The least recently used goes (dicts keep insertion order).
                self.loaded.pop(next(iter(self.loaded)))
            m = rm_worker.read_artifact_manifest(artifact_dir)
            self.loaded[key] = hf_engine.load(artifact_dir, m["dtype"], "cpu")
        model = self.loaded.pop(key)
        self.loaded[key] = model
        return model

    def generate(self, params, emit):
        return self._load(params["key"], params["artifact_dir"]).generate(params, emit)

    def forward(self, params):
        return self._load(params["key"], params["artifact_dir"]).forward(params)

    def cleanup(self, key):
        self.loaded.pop(key, None)


if __name__ == "__main__":
    rm_worker.serve(CpuTransformersWorker())
