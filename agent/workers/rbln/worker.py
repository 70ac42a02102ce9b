#!/usr/bin/env python3
"""rm-agent worker for Rebellions ATOM NPUs through optimum-rbln.

UNVERIFIED ON HARDWARE: the RBLN SDK is not available where this was written.
It follows optimum-rbln's documented API:
  compile: RBLNAutoModelForCausalLM.from_pretrained(path, export=True,
           rbln_batch_size=..., rbln_max_seq_len=..., rbln_tensor_parallel_size=...,
           rbln_device=...) then save_pretrained(output_dir)
  serve:   RBLNAutoModelForCausalLM.from_pretrained(artifact_dir, export=False,
           rbln_device=...) then .generate(...) as in transformers.
The agent passes the allocation's device ids in RM_DEVICES (and RBLN_DEVICES).
options.extra: only the rbln_* arguments manifest.json declares under
"extra_options", converted to their types (rm_worker.typed_extras).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "common"))
import hf_engine  # noqa: E402
import rm_worker  # noqa: E402
from rm_worker import WorkerError  # noqa: E402


def rbln_device_arg():
    ids = [int(d) for d in rm_worker.devices() if d.isdigit()]
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


class RblnWorker(rm_worker.Worker):
    def __init__(self):
        self.loaded = {}
        try:
            import optimum.rbln  # noqa: F401
            import rebel  # noqa: F401 - the RBLN compiler/runtime
            self.compiler_version = "optimum-rbln-%s+rebel-%s" % (
                getattr(optimum.rbln, "__version__", "?"), getattr(rebel, "__version__", "?"))
            self.error = None
        except ImportError as e:
            self.compiler_version = "none"
            self.error = "optimum-rbln / rebel-compiler not installed: %s" % e

    def probe(self):
        return (self.error is None), self.error

    def compile(self, params, progress):
        if params["model_format"] != "safetensors":
            raise WorkerError("the RBLN worker compiles HF safetensors models, not GGUF", "unsupported")
        opts = params.get("options") or {}
        kwargs = {"export": True}
        if opts.get("batchSize"):
            kwargs["rbln_batch_size"] = opts["batchSize"]
        if opts.get("maxSeqLen"):
            kwargs["rbln_max_seq_len"] = opts["maxSeqLen"]
        if opts.get("tensorParallelSize"):
            kwargs["rbln_tensor_parallel_size"] = opts["tensorParallelSize"]
        dev = rbln_device_arg()
        if dev is not None:
            kwargs["rbln_device"] = dev
        # Only the keys manifest.json declares ("extra_options"), typed.
        kwargs.update(rm_worker.typed_extras(opts.get("extra"), HERE, reserved=kwargs))
        from optimum.rbln import RBLNAutoModelForCausalLM
        progress(0.05, "export+compile")
        model = RBLNAutoModelForCausalLM.from_pretrained(params["model_path"], **kwargs)
        progress(0.9, "save")
        model.save_pretrained(params["output_dir"])
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                     "generation_config.json"):
            p = os.path.join(params["model_path"], name)
            if os.path.isfile(p) and not os.path.exists(os.path.join(params["output_dir"], name)):
                import shutil
                shutil.copyfile(p, os.path.join(params["output_dir"], name))
        rm_worker.write_artifact_manifest(params["output_dir"], engine="optimum-rbln", options=opts)
        progress(1.0, "done")

    def _load(self, key, artifact_dir):
        if key not in self.loaded:
            from optimum.rbln import RBLNAutoModelForCausalLM
            from transformers import AutoTokenizer
            kwargs = {"export": False}
            dev = rbln_device_arg()
            if dev is not None:
                kwargs["rbln_device"] = dev
            model = RBLNAutoModelForCausalLM.from_pretrained(artifact_dir, **kwargs)
            try:
                tok = AutoTokenizer.from_pretrained(artifact_dir)
            except Exception:  # noqa: BLE001
                tok = None
            self.loaded[key] = (model, tok)
        return self.loaded[key]

    def generate(self, params, emit):
        import torch
        model, tok = self._load(params["key"], params["artifact_dir"])
        p = params["params"]
        # optimum-rbln models generate through transformers' GenerationMixin:
        # the same arguments as the transformers engine (repetition_penalty,
        # min_new_tokens, and EOS suppressed when stop_at_eos is off).
        kwargs = hf_engine.generate_kwargs(p)
        outputs = []
        for i, x in enumerate(params["prompts"]):
            # model.generate runs a whole prompt; a cancel stops before the next.
            rm_worker.raise_if_cancelled()
            if isinstance(x, str):
                if tok is None:
                    raise WorkerError("no tokenizer in the artifact; send input_ids", "invalid_request")
                x = tok(x)["input_ids"]
            ids = torch.tensor([x])
            if p["do_sample"]:
                torch.manual_seed(p["seed"])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            toks = out[0, ids.shape[1]:].tolist()
            if params.get("stream"):
                for t in toks:
                    emit(i, t)
            outputs.append({"prompt_tokens": len(x), "token_ids": toks,
                            "text": tok.decode(toks, skip_special_tokens=True) if tok else None,
                            "finish_reason": rm_worker.finish_reason(toks, set(p["eos_token_ids"]), p["max_new_tokens"])})
        return outputs

    def cleanup(self, key):
        self.loaded.pop(key, None)


if __name__ == "__main__":
    rm_worker.serve(RblnWorker())
