#!/usr/bin/env python3
"""rm-agent worker for NVIDIA GPUs: vLLM's offline `LLM` API, or
transformers + torch on CUDA when vLLM is not installed.

UNVERIFIED ON HARDWARE unless agent/README.md says otherwise.

"compile" for a GPU is a checked copy of the HF model directory into the
cache plus artifact.json recording dtype, max_model_len and the engine; the
CUDA graphs / kernels are built by the engine at load time.
The agent sets CUDA_VISIBLE_DEVICES to the allocation's GPUs before start.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
import hf_engine  # noqa: E402
import rm_worker  # noqa: E402
from rm_worker import WorkerError  # noqa: E402

DTYPES = {None: "auto", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def engine_name():
    try:
        import vllm  # noqa: F401
        return "vllm"
    except ImportError:
        pass
    try:
        import torch
        import transformers  # noqa: F401
        if torch.cuda.is_available():
            return "transformers"
    except ImportError:
        pass
    return None


class GpuWorker(rm_worker.Worker):
    def __init__(self):
        self.engine = engine_name()
        self.loaded = {}
        version = "none"
        if self.engine == "vllm":
            import vllm
            version = "vllm-" + vllm.__version__
        elif self.engine == "transformers":
            version = hf_engine.versions()
        self.compiler_version = version

    def probe(self):
        if self.engine is None:
            return False, "neither vllm nor transformers+torch with CUDA is installed in the worker's Python"
        return True, None

    def compile(self, params, progress):
        if params["model_format"] != "safetensors":
            raise WorkerError("the GPU worker takes HF safetensors models, not GGUF", "unsupported")
        opts = params.get("options") or {}
        precision = opts.get("precision")
        if precision not in DTYPES:
            raise WorkerError("precision %s is not supported on GPU; use fp32, fp16 or bf16" % precision, "invalid_request")
        progress(0.1, "copy")
        rm_worker.copy_model_files(params["model_path"], params["output_dir"])
        rm_worker.write_artifact_manifest(
            params["output_dir"], engine=self.engine, dtype=DTYPES[precision],
            max_model_len=opts.get("maxSeqLen"), tensor_parallel_size=opts.get("tensorParallelSize") or 1,
        )
        progress(1.0, "done")

    def _load(self, key, artifact_dir):
        if key in self.loaded:
            return self.loaded[key]
        m = rm_worker.read_artifact_manifest(artifact_dir)
        if self.engine == "vllm":
            from vllm import LLM
            kwargs = {"model": artifact_dir, "dtype": m["dtype"], "tensor_parallel_size": m["tensor_parallel_size"]}
            if m.get("max_model_len"):
                kwargs["max_model_len"] = m["max_model_len"]
            obj = ("vllm", LLM(**kwargs))
        else:
            obj = ("transformers", hf_engine.load(artifact_dir, m["dtype"], "cuda"))
        self.loaded[key] = obj
        return obj

    def generate(self, params, emit):
        kind, obj = self._load(params["key"], params["artifact_dir"])
        p = params["params"]
        prompts = params["prompts"]
        outputs = []
        if kind == "vllm":
            from vllm import SamplingParams
            sp = SamplingParams(
                max_tokens=p["max_new_tokens"],
                temperature=p["temperature"] if p["do_sample"] else 0.0,
                top_p=p.get("top_p") or 1.0,
                top_k=p.get("top_k") or -1,
                seed=p["seed"],
                stop_token_ids=p["eos_token_ids"] or None,
                ignore_eos=not p["stop_at_eos"],
                repetition_penalty=rm_worker.repetition_penalty(p),
                min_tokens=min(rm_worker.min_new_tokens(p), p["max_new_tokens"]),
            )
            inputs = [{"prompt_token_ids": x} if isinstance(x, list) else x for x in prompts]
            for i, r in enumerate(obj.generate(inputs, sp)):
                o = r.outputs[0]
                toks = list(o.token_ids)
                if params.get("stream"):
                    for t in toks:
                        emit(i, t)
                outputs.append({"prompt_tokens": len(r.prompt_token_ids), "token_ids": toks, "text": o.text,
                                "finish_reason": "eos" if o.finish_reason == "stop" else "length"})
            return outputs
        return obj.generate(params, emit)

    def forward(self, params):
        kind, obj = self._load(params["key"], params["artifact_dir"])
        if kind != "transformers":
            raise WorkerError("this worker runs the model on vLLM, which serves generation only; logits "
                              "need the transformers engine (a worker image without vLLM)", "unsupported")
        return obj.forward(params)

    def cleanup(self, key):
        self.loaded.pop(key, None)


if __name__ == "__main__":
    rm_worker.serve(GpuWorker())
