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
            import torch
            import transformers
            version = "transformers-%s+torch-%s" % (transformers.__version__, torch.__version__)
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
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            dtype = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[m["dtype"]]
            import transformers
            dkw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            model = AutoModelForCausalLM.from_pretrained(artifact_dir, **{dkw: dtype}).to("cuda").eval()
            try:
                tok = AutoTokenizer.from_pretrained(artifact_dir)
            except Exception:  # noqa: BLE001 - token-id prompts still work
                tok = None
            obj = ("transformers", (model, tok))
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
        import torch
        model, tok = obj
        for i, x in enumerate(prompts):
            # model.generate runs a whole prompt; a cancel stops before the next.
            rm_worker.raise_if_cancelled()
            if isinstance(x, str):
                if tok is None:
                    raise WorkerError("no tokenizer in the artifact; send input_ids", "invalid_request")
                x = tok(x)["input_ids"]
            ids = torch.tensor([x], device="cuda")
            kwargs = {"max_new_tokens": p["max_new_tokens"], "do_sample": p["do_sample"]}
            if p["do_sample"]:
                torch.manual_seed(p["seed"])
                kwargs.update(temperature=p["temperature"], top_p=p.get("top_p") or 1.0, top_k=p.get("top_k") or 0)
            if p["eos_token_ids"]:
                kwargs["eos_token_id"] = p["eos_token_ids"]
            if not p["stop_at_eos"]:
                kwargs["min_new_tokens"] = p["max_new_tokens"]
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            toks = out[0, ids.shape[1]:].tolist()
            if params.get("stream"):
                for t in toks:
                    emit(i, t)
            eos = set(p["eos_token_ids"] or ([model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int) else (model.generation_config.eos_token_id or [])))
            outputs.append({"prompt_tokens": len(x), "token_ids": toks,
                            "text": tok.decode(toks, skip_special_tokens=True) if tok else None,
                            "finish_reason": rm_worker.finish_reason(toks, eos, p["max_new_tokens"])})
        return outputs

    def forward(self, params):
        kind, obj = self._load(params["key"], params["artifact_dir"])
        if kind != "transformers":
            raise WorkerError("this worker runs the model on vLLM, which serves generation only; logits "
                              "need the transformers engine (a worker image without vLLM)", "unsupported")
        import torch
        model, _ = obj
        outputs = []
        for x in params["input_ids"]:
            rm_worker.raise_if_cancelled()
            keep = rm_worker.kept_rows(len(x), params.get("logits_to_keep"))
            ids = torch.tensor([x], device="cuda")
            with torch.no_grad():
                logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0, -keep:]
            rows = logits.float().cpu()
            outputs.append({"positions": keep, "vocab_size": rows.shape[-1],
                            "logits": rm_worker.f32le_base64(rows.flatten().tolist())})
        return outputs

    def cleanup(self, key):
        self.loaded.pop(key, None)


if __name__ == "__main__":
    rm_worker.serve(GpuWorker())
