#!/usr/bin/env python3
"""rm-agent worker for FuriosaAI RNGD NPUs through furiosa-llm.

UNVERIFIED ON HARDWARE: the Furiosa SDK is not available where this was
written. It follows furiosa-llm's documented flow:
  compile: furiosa_llm.artifact.builder.ArtifactBuilder(model, tensor_parallel_size=...,
           max_seq_len_to_capture=...).build(output_dir)
  serve:   furiosa_llm.LLM.load_artifact(artifact_dir, devices="npu:0,...") (older
           releases: LLM(artifact_dir, devices=...)) then .generate(prompts, SamplingParams(...)).
The agent passes the allocation's device ids in RM_DEVICES (and FURIOSA_DEVICES).
options.extra: only the ArtifactBuilder arguments manifest.json declares under
"extra_options", converted to their types (rm_worker.typed_extras).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "common"))
import rm_worker  # noqa: E402
from rm_worker import WorkerError  # noqa: E402


def devices_arg():
    ids = rm_worker.devices()
    return ",".join(d if d.startswith("npu:") else "npu:%s" % d for d in ids) or None


class FuriosaWorker(rm_worker.Worker):
    def __init__(self):
        self.loaded = {}
        try:
            import furiosa_llm
            self.compiler_version = "furiosa-llm-%s" % getattr(furiosa_llm, "__version__", "?")
            self.error = None
        except ImportError as e:
            self.compiler_version = "none"
            self.error = "furiosa-llm is not installed: %s" % e

    def probe(self):
        return (self.error is None), self.error

    def compile(self, params, progress):
        if params["model_format"] != "safetensors":
            raise WorkerError("the Furiosa worker builds from HF safetensors models, not GGUF", "unsupported")
        opts = params.get("options") or {}
        kwargs = {}
        if opts.get("tensorParallelSize"):
            kwargs["tensor_parallel_size"] = opts["tensorParallelSize"]
        if opts.get("maxSeqLen"):
            kwargs["max_seq_len_to_capture"] = opts["maxSeqLen"]
        # Only the keys manifest.json declares ("extra_options"), typed.
        kwargs.update(rm_worker.typed_extras(opts.get("extra"), HERE, reserved=kwargs))
        from furiosa_llm.artifact.builder import ArtifactBuilder
        progress(0.05, "build")
        ArtifactBuilder(params["model_path"], **kwargs).build(params["output_dir"])
        rm_worker.write_artifact_manifest(params["output_dir"], engine="furiosa-llm", options=opts)
        progress(1.0, "done")

    def _load(self, key, artifact_dir):
        if key not in self.loaded:
            from furiosa_llm import LLM
            dev = devices_arg()
            kwargs = {"devices": dev} if dev else {}
            if hasattr(LLM, "load_artifact"):
                self.loaded[key] = LLM.load_artifact(artifact_dir, **kwargs)
            else:
                self.loaded[key] = LLM(artifact_dir, **kwargs)
        return self.loaded[key]

    def generate(self, params, emit):
        from furiosa_llm import SamplingParams
        llm = self._load(params["key"], params["artifact_dir"])
        p = params["params"]
        sp = SamplingParams(
            max_tokens=p["max_new_tokens"],
            temperature=p["temperature"] if p["do_sample"] else 0.0,
            top_p=p.get("top_p") or 1.0,
            top_k=p.get("top_k") or -1,
            # Both in furiosa-llm's SamplingParams (2025.x to 2026.x docs).
            repetition_penalty=rm_worker.repetition_penalty(p),
            min_tokens=min(rm_worker.min_new_tokens(p), p["max_new_tokens"]),
        )
        prompts = [{"prompt_token_ids": x} if isinstance(x, list) else x for x in params["prompts"]]
        outputs = []
        for i, r in enumerate(llm.generate(prompts, sp)):
            o = r.outputs[0]
            toks = list(o.token_ids)
            if params.get("stream"):
                for t in toks:
                    emit(i, t)
            outputs.append({"prompt_tokens": len(getattr(r, "prompt_token_ids", []) or []), "token_ids": toks,
                            "text": o.text, "finish_reason": "eos" if getattr(o, "finish_reason", "") == "stop" else "length"})
        return outputs

    def cleanup(self, key):
        self.loaded.pop(key, None)


if __name__ == "__main__":
    rm_worker.serve(FuriosaWorker())
