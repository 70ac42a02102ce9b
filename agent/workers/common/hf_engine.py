"""The transformers + torch engine shared by the workers that run HF models
with torch: gpu-vllm (device "cuda", where vLLM is not installed) and
cpu-transformers (device "cpu"). One copy, so that both answer generate and
forward alike.

`load(artifact_dir, dtype, device)` gives an `HfModel`; its `generate` and
`forward` take the protocol's params and answer the protocol's outputs
(agent/README.md). Tokens are streamed while they are generated, and a
cancel from the agent stops generation at the next token (rm_worker).
torch and transformers are imported only when a model is loaded, so a
worker without them can still answer `hello` with the reason.
"""
import rm_worker
from rm_worker import WorkerError

# artifact.json's dtype names.
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")


def versions():
    """`transformers-X+torch-Y`: part of the cache key of what this engine runs."""
    import torch
    import transformers
    return "transformers-%s+torch-%s" % (transformers.__version__, torch.__version__)


def missing_packages():
    """None when torch and transformers import, else why not (for probe)."""
    missing = []
    for name in ("torch", "transformers"):
        try:
            __import__(name)
        except Exception as e:  # noqa: BLE001 - a broken install is as missing as none
            missing.append("%s (%s: %s)" % (name, type(e).__name__, e))
    if not missing:
        return None
    return ("cannot import %s in the worker's Python; give the agent a Python with torch and transformers "
            "(--worker-python)" % ", ".join(missing))


def _torch_dtype(name):
    import torch
    table = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise WorkerError("artifact.json names dtype %r; this engine runs %s" % (name, ", ".join(DTYPE_NAMES)),
                          "invalid_request")
    return table[name]


def load(artifact_dir, dtype, device):
    """The model and (when the artifact has one) tokenizer of `artifact_dir`,
    at `dtype` (a DTYPE_NAMES entry) on torch device `device`."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    # transformers 5 renamed torch_dtype to dtype.
    dkw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(artifact_dir, **{dkw: _torch_dtype(dtype)}).to(device).eval()
    try:
        tok = AutoTokenizer.from_pretrained(artifact_dir)
    except Exception:  # noqa: BLE001 - token-id prompts still work
        tok = None
    return HfModel(model, tok, device)


def generate_kwargs(p):
    """transformers generate() arguments for the protocol's params `p`
    (besides the input), with the same meanings as the agent's. Optional
    fields that are absent are off."""
    kwargs = {"max_new_tokens": p["max_new_tokens"], "do_sample": p["do_sample"]}
    if p["do_sample"]:
        kwargs.update(temperature=p["temperature"], top_p=p.get("top_p") or 1.0, top_k=p.get("top_k") or 0)
    if p["eos_token_ids"]:
        kwargs["eos_token_id"] = p["eos_token_ids"]
    penalty = rm_worker.repetition_penalty(p)
    if penalty != 1.0:
        kwargs["repetition_penalty"] = penalty
    min_new = rm_worker.min_new_tokens(p)
    if not p["stop_at_eos"]:
        # EOS is suppressed until the end: always max_new_tokens.
        min_new = p["max_new_tokens"]
    if min_new:
        kwargs["min_new_tokens"] = min(min_new, p["max_new_tokens"])
    return kwargs


class _Streamer:
    """transformers' streamer interface (put/end): sends each new token to
    the agent as it is generated. generate() first puts the prompt."""

    def __init__(self, index, emit):
        self.index, self.emit, self.prompt_seen = index, emit, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            # Raises rm_worker.Cancelled once the agent cancelled.
            self.emit(self.index, t)

    def end(self):
        pass


def _cancel_criteria():
    """A StoppingCriteria that stops generate() at the next token once the
    agent cancelled, by raising Cancelled (a stop would answer a result)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnCancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            rm_worker.raise_if_cancelled()
            import torch
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnCancel()])


class HfModel:
    def __init__(self, model, tok, device):
        self.model, self.tok, self.device = model, tok, device

    def _model_eos(self):
        eos = self.model.generation_config.eos_token_id
        if isinstance(eos, int):
            return {eos}
        return set(eos or [])

    def _ids(self, prompt):
        if isinstance(prompt, str):
            if self.tok is None:
                raise WorkerError("no tokenizer in the artifact; send input_ids", "invalid_request")
            return self.tok(prompt)["input_ids"]
        return prompt

    def generate(self, params, emit):
        import torch
        p = params["params"]
        kwargs = generate_kwargs(p)
        eos = set(p["eos_token_ids"] or self._model_eos())
        outputs = []
        for i, prompt in enumerate(params["prompts"]):
            rm_worker.raise_if_cancelled()
            x = self._ids(prompt)
            ids = torch.tensor([x], device=self.device)
            if p["do_sample"]:
                torch.manual_seed(p["seed"])
            run = dict(kwargs, stopping_criteria=_cancel_criteria())
            if params.get("stream"):
                run["streamer"] = _Streamer(i, emit)
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **run)
            toks = out[0, ids.shape[1]:].tolist()
            outputs.append({"prompt_tokens": len(x), "token_ids": toks,
                            "text": self.tok.decode(toks, skip_special_tokens=True) if self.tok else None,
                            "finish_reason": rm_worker.finish_reason(toks, eos, p["max_new_tokens"])})
        return outputs

    def forward(self, params):
        """transformers' model(input_ids).logits, per sequence, as float32."""
        import torch
        outputs = []
        for x in params["input_ids"]:
            rm_worker.raise_if_cancelled()
            keep = rm_worker.kept_rows(len(x), params.get("logits_to_keep"))
            ids = torch.tensor([x], device=self.device)
            with torch.no_grad():
                logits = self.model(ids, attention_mask=torch.ones_like(ids)).logits[0, -keep:]
            rows = logits.float().cpu()
            outputs.append({"positions": keep, "vocab_size": rows.shape[-1],
                            "logits": rm_worker.f32le_base64(rows.flatten().tolist())})
        return outputs
