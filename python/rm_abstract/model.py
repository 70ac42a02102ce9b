"""Loading a model through the agent, and the proxy that stands in for it.

The proxy is not a torch module: the weights live in the agent (compiled for
the device), so the pod needs neither torch nor the accelerator's SDK. It
answers what inference scripts touch (config, generation_config, device,
eval(), to(), generate()) and says clearly what it cannot do.
"""
from __future__ import annotations

import json
import os
import random
import sys
import types

from . import _log
from . import logits as _logits
from .client import AgentClient, AgentError, AgentUnavailable
from .exceptions import RMUnavailableError

# Weight formats the agent does not read; the agent leaves them out of the
# model digest, so we must not upload them either (the digests would differ).
_UNREAD = (".bin", ".gguf", ".pt")


def _walk(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                full = os.path.join(dirpath, f)
                out.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    return out


def model_files(path, gguf_file=None):
    """The (name, file) list to upload, mirroring the agent's own detection."""
    if gguf_file:
        path = os.path.join(path, gguf_file) if os.path.isdir(path) else gguf_file
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return [("model.gguf", path)]
        raise ValueError("%s is not a model: expected a directory or a .gguf file" % path)
    files = _walk(path)
    names = [n for n, _ in files]
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return [(n, f) for n, f in files if not n.endswith(_UNREAD)]
    ggufs = [(n, f) for n, f in files if n.endswith(".gguf")]
    if len(ggufs) == 1:
        return [("model.gguf", ggufs[0][1])]
    raise ValueError("%s holds no model the agent can read: it needs config.json + *.safetensors, "
                     "or one .gguf (pass gguf_file= to pick one)" % path)


# -- which classes the agent serves -------------------------------------------------

_causal_names = None


def _causal_class_names():
    """transformers' own list of causal-LM classes (GPT2LMHeadModel,
    CTRLLMHeadModel, ... besides the *ForCausalLM ones); importable
    without torch, and only imported when a model is loaded."""
    global _causal_names
    if _causal_names is None:
        names = set()
        try:
            import importlib
            mapping = importlib.import_module("transformers.models.auto.modeling_auto").MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            for v in mapping.values():
                names.update(v if isinstance(v, (tuple, list)) else (v,))
        except Exception:  # an unknown transformers layout: the name rules below still apply
            pass
        _causal_names = names
    return _causal_names


def serves(cls_name):
    """Whether the agent can serve a model loaded through this class: causal
    language models only (it generates text and scores tokens).
    *ForConditionalGeneration classes (sequence-to-sequence, and
    vision-language models whose class transformers also lists as causal)
    need an encoder or image inputs the agent does not take."""
    if cls_name.startswith("AutoModel"):
        return cls_name == "AutoModelForCausalLM"
    if cls_name.endswith("ForConditionalGeneration"):
        return False
    return cls_name.endswith("ForCausalLM") or cls_name in _causal_class_names()


# from_pretrained arguments that say where the model is: used, never warned about
_LOCATE = ("revision", "subfolder", "gguf_file", "token", "cache_dir", "local_files_only", "trust_remote_code",
           "config", "force_download", "proxies", "use_safetensors", "variant", "code_revision", "use_auth_token")
_DTYPES = {"float16": "fp16", "half": "fp16", "fp16": "fp16", "bfloat16": "bf16", "bf16": "bf16",
           "float32": "fp32", "float": "fp32", "fp32": "fp32", "auto": None}


def _compile_options(cfg, name, kwargs, gguf):
    """The compile options for this load: the settings' (the workload's
    spec.compile), plus `dtype=`/`torch_dtype=` as a precision when those
    do not set one. Placement and kernel arguments (device_map,
    attn_implementation, quantization_config, ...) are the agent's to
    decide: one warning line names the ones ignored."""
    opts = dict(cfg.compile_options)
    given = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if given is not None and not gguf:
        key = str(given).replace("torch.", "").lower()
        if key not in _DTYPES:
            _log.warn_once("dtype:" + key, "from_pretrained(): dtype %s has no compile precision; the agent "
                           "compiles at its default (fp32 on CPU); choose one of fp32, fp16, bf16, q8_0, q4 "
                           "with compile option precision" % key)
        elif _DTYPES[key] is not None:
            if "precision" in opts and opts["precision"] != _DTYPES[key]:
                _log.warn_once("dtype-vs-precision", "from_pretrained(): dtype %s ignored: the compile options "
                               "(RM_COMPILE_OPTIONS / the workload's spec.compile) set precision %s"
                               % (key, opts["precision"]))
            else:
                opts["precision"] = _DTYPES[key]
    ignored = sorted(k for k in kwargs if k not in _LOCATE and k not in ("dtype", "torch_dtype")
                     and not k.startswith("_"))
    if ignored:
        hint = ""
        if any(k in ("quantization_config", "load_in_8bit", "load_in_4bit") for k in ignored):
            hint = "; for a quantized model set compile option precision q8_0 or q4"
        _log.warn_once("fp-ignored:" + ",".join(ignored),
                       "from_pretrained(): ignoring %s: the node agent places and compiles %s "
                       "(compile options: RM_COMPILE_OPTIONS, the workload's spec.compile)%s"
                       % (", ".join(ignored), name, hint))
    return opts


def load(state, cls_name, name, kwargs, original):
    """Registers + prepares `name` on the agent; returns a RemoteModel.

    `original` is transformers' own from_pretrained, used only in mode
    'fallback' (with one warning line), never silently.
    """
    cfg = state.config
    try:
        if state.config_error is not None:
            raise RMUnavailableError("rm_abstract is not configured: %s" % state.config_error)
        if not serves(cls_name):
            raise RMUnavailableError("the node agent serves causal language models (AutoModelForCausalLM, "
                                     "*ForCausalLM, *LMHeadModel), not %s" % cls_name)
        return _load(cfg, name, kwargs)
    except (AgentError, RMUnavailableError) as e:
        why = getattr(e, "agent_message", None) or str(e)
        on = cfg.on_unavailable if cfg is not None else "fail"
        if on == "fallback":
            _log.warn("cannot run %s on %s (%s); falling back to transformers in this process (RM_ON_UNAVAILABLE=fallback)"
                      % (name, cfg.device if cfg else "?", why))
            return original(name, **kwargs)
        raise RMUnavailableError("cannot run %s on %s: %s (set RM_ON_UNAVAILABLE=fallback to run it in this process instead)"
                                 % (name, cfg.device if cfg else "?", why), reason=why) from None


def _load(cfg, name, kwargs):
    client = AgentClient(cfg.socket, cfg.token)
    client.health()  # fail early and clearly (no socket, no permission) before hashing weights
    name = os.fspath(name)
    local = os.path.join(name, kwargs["subfolder"]) if kwargs.get("subfolder") else name
    gguf = kwargs.get("gguf_file")
    is_gguf = bool(gguf)
    if os.path.exists(local):
        files = model_files(local, gguf)
        is_gguf = files[0][0] == "model.gguf"
        reg = client.register_files(files)
    elif gguf:
        raise RMUnavailableError("a hub id with gguf_file= cannot be sent to the agent; download the file and pass its directory")
    else:
        reg = client.register_hub(name, kwargs.get("revision"))

    progress = None
    if cfg.verbose:
        last = [-1]

        def progress(fraction, stage):  # one line per 10 %, not per event
            step = int((fraction or 0) * 10)
            if step != last[0]:
                last[0] = step
                _log.info("compiling %s for %s: %3d%% %s" % (name, cfg.device, step * 10, stage or ""))
    options = _compile_options(cfg, name, kwargs, is_gguf)
    prep = client.prepare(reg["model"], cfg.device, options, progress)
    _log.info("%s on %s via backend %s (%s)" % (
        name, cfg.device, prep.get("backend"), "cached" if prep.get("cached") else "compiled"))
    config, gen_config = _configs(name, local, kwargs)
    return _proxy_class(config)(client, cfg.device, prep, reg, name, config, gen_config)


def _configs(name, local, kwargs):
    """The real transformers config objects when transformers can build them."""
    keep = {k: kwargs[k] for k in ("revision", "subfolder", "gguf_file", "token", "trust_remote_code",
                                   "cache_dir", "local_files_only") if k in kwargs}
    config = gen = None
    try:
        from transformers import AutoConfig
        config = kwargs.get("config") or AutoConfig.from_pretrained(name, **keep)
    except Exception:
        path = os.path.join(local, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                config = types.SimpleNamespace(**json.load(f))
    try:
        from transformers import GenerationConfig
        try:
            gen = GenerationConfig.from_pretrained(name, **{k: v for k, v in keep.items() if k != "gguf_file"})
        except Exception:
            gen = GenerationConfig.from_model_config(config) if config is not None and hasattr(config, "to_dict") else None
    except Exception:
        gen = None
    return config, gen


# -- tensors in, same kind out ---------------------------------------------------

def _kind(x):
    mod = type(x).__module__.split(".")[0]
    return mod if mod in ("torch", "numpy") else "list"


def _rows(x):
    v = x.tolist() if hasattr(x, "tolist") else list(x)
    if v and not isinstance(v[0], (list, tuple)):
        return [list(v)], True
    return [list(r) for r in v], False


def _as_kind(rows, kind, flat=False):
    if kind == "torch":
        import torch
        return torch.tensor(rows[0] if flat else rows, dtype=torch.long)
    if kind == "numpy":
        import numpy
        return numpy.array(rows[0] if flat else rows, dtype=numpy.int64)
    return rows[0] if flat else rows


def _array_kind(kind):
    """Streamers call .shape/.tolist(): give them an array even for list input."""
    if kind != "list":
        return kind
    for k in ("numpy", "torch"):
        if k in sys.modules:
            return k
    try:
        import numpy  # noqa: F401
        return "numpy"
    except ImportError:
        return "list"


def _ids(v):
    if v is None:
        return None
    if hasattr(v, "tolist"):
        v = v.tolist()
    return [int(t) for t in v] if isinstance(v, (list, tuple)) else [int(v)]


def _history(past, batch):
    """The tokens a past_key_values stands for: ours, or an empty cache."""
    if past is None:
        return [[] for _ in range(batch)]
    if isinstance(past, _logits.RemoteCache):
        if len(past.rows) != batch:
            raise ValueError("past_key_values holds %d rows, input_ids %d" % (len(past.rows), batch))
        return past.rows
    seq_len = getattr(past, "get_seq_length", None)
    if callable(seq_len) and seq_len() == 0:
        return [[] for _ in range(batch)]  # an empty DynamicCache made by the script
    raise NotImplementedError("rm_abstract: past_key_values must come from this model's previous forward(); "
                              "the key/value tensors live in the node agent")


def _gc(gen_config, name, default=None):
    v = getattr(gen_config, name, None) if gen_config is not None else None
    return default if v is None else v


# generation-config fields the agent does not apply, with their neutral value
_GC_UNSUPPORTED = {"no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
                   "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                   "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None,
                   "length_penalty": 1.0, "diversity_penalty": 0.0, "encoder_repetition_penalty": 1.0,
                   "exponential_decay_length_penalty": None, "sequence_bias": None, "guidance_scale": None,
                   "penalty_alpha": None, "renormalize_logits": False, "num_beam_groups": 1,
                   "output_scores": False, "output_logits": False, "output_attentions": False,
                   "output_hidden_states": False}


def _neutral(k, v):
    """An argument that asks for nothing (None, False, or the neutral value)."""
    if v is None or v is False:
        return True
    n = _GC_UNSUPPORTED.get(k)
    return isinstance(v, (int, float)) and n is not None and v == n


def _warn_unsupported_gc(gc):
    """One line for fields of the model's generation_config that would
    change transformers' output and that the agent does not apply."""
    if gc is None:
        return
    odd = sorted(k for k in _GC_UNSUPPORTED if not _neutral(k, getattr(gc, k, None))
                 and getattr(gc, k, None) not in ([], {}))
    if odd:
        _log.warn_once("gc:" + ",".join(odd), "generate(): the generation config sets %s, which the node agent "
                       "does not apply; tokens may differ from transformers' own generate()" % ", ".join(odd))


_proxy_classes = {}


def _proxy_class(config):
    """The proxy's class, named after the model's architecture
    (LlamaForCausalLM, GPT2LMHeadModel, ...): pipelines check the model's
    class name against their task's list and log a long error for any
    other, so a proxy named RemoteModel would be reported as unsupported."""
    archs = getattr(config, "architectures", None) or []
    name = next((a for a in archs if isinstance(a, str) and a.isidentifier() and serves(a)), None)
    if name is None:
        return RemoteModel
    cls = _proxy_classes.get(name)
    if cls is None:
        cls = type(name, (RemoteModel,), {"__module__": "rm_abstract.model",
                                          "__doc__": "rm_abstract's proxy for a %s in the node agent" % name})
        _proxy_classes[name] = cls
    return cls


class RemoteModel:
    """Stands in for a PreTrainedModel whose weights live in the node agent."""

    def __init__(self, client, device, prepared, registered, name, config, generation_config):
        self._client = client
        self.rm_device = device
        self.rm_key = prepared["key"]
        self.rm_backend = prepared.get("backend")
        self.rm_model = registered["model"]
        self.name_or_path = name
        self.config = config
        self.generation_config = generation_config
        self.training = False

    def __repr__(self):
        return "RemoteModel(%r on %s via rm-agent backend %s)" % (self.name_or_path, self.rm_device, self.rm_backend)

    # Inputs stay on the host: the agent moves them to the accelerator. So the
    # "device" a script moves tensors to is the CPU, and to()/cuda() are no-ops.
    @property
    def device(self):
        if "torch" in sys.modules:
            return sys.modules["torch"].device("cpu")
        return "cpu"

    @property
    def dtype(self):
        """The dtype of what the model returns here (logits: float32),
        whatever precision the agent computes in."""
        if "torch" in sys.modules:
            return sys.modules["torch"].float32
        return "float32"

    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self

    def train(self, mode=True):
        if mode:
            _log.warn("train() has no effect: the model runs in the node agent, inference only")
        return self

    cpu = cuda = half = float = bfloat16 = eval

    def can_generate(self):
        return True

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, return_dict=None, logits_to_keep=0, **kwargs):
        """transformers' forward: logits (batch, positions, vocab) as float32
        of the input's kind, `loss` with `labels`, `past_key_values` for the
        next call. Runs on the agent (POST /v1/forward)."""
        if inputs_embeds is not None:
            raise NotImplementedError("rm_abstract: inputs_embeds is not supported: the embeddings live in the node agent; pass input_ids")
        if input_ids is None:
            raise ValueError("forward() needs input_ids")
        if kwargs.get("num_logits_to_keep") is not None:  # transformers < 4.50 spelling
            logits_to_keep = kwargs.pop("num_logits_to_keep")
        for k in ("position_ids", "cache_position", "token_type_ids", "output_attentions",
                  "output_hidden_states", "num_logits_to_keep"):
            kwargs.pop(k, None)
        if kwargs:
            _log.warn("forward(): ignoring arguments the agent does not support: %s" % ", ".join(sorted(kwargs)))
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise NotImplementedError("rm_abstract: logits_to_keep must be a count (0 keeps every position)")
        kind = _kind(input_ids)
        rows = _rows(input_ids)[0]  # 1-D input is one row, as a batch of 1
        width = len(rows[0]) if rows else 0
        masks = _rows(attention_mask)[0] if attention_mask is not None else [[1] * len(r) for r in rows]
        if any(len(mk) < width for mk in masks):
            raise ValueError("attention_mask is shorter than input_ids (%d columns): it needs one entry per token"
                             % width)
        # with past_key_values, transformers' mask also covers the past tokens
        masks = [mk[len(mk) - width:] for mk in masks]
        history = _history(past_key_values, len(rows))

        # Each row runs without its pads; with a loss, every position is
        # needed whatever logits_to_keep says.
        out_width = width if logits_to_keep == 0 else min(logits_to_keep, width)
        need_from = 0 if labels is not None else width - out_width
        reals, sequences, keeps = [], [], []
        for r, (row, mk) in enumerate(zip(rows, masks)):
            real = [c for c, m in enumerate(mk) if m]  # the columns that are not padding
            reals.append(real)
            sequences.append(history[r] + [int(row[c]) for c in real])
            keeps.append(sum(1 for c in real if c >= need_from))

        placed, vocab = {}, None
        for keep, pieces in _logits.plan(sequences, keeps):
            result = self._client.request("POST", "/v1/forward", {
                "key": self.rm_key, "device": self.rm_device,
                "input_ids": [ids for _, ids in pieces], "logits_to_keep": keep})
            for (r, ids), out in zip(pieces, result["outputs"]):
                vocab = out["vocab_size"]
                # the rows are positions len(ids) - keep .. len(ids) of the
                # sequence, which starts with the history
                first = len(ids) - keep - len(history[r])
                for j, row in enumerate(_logits.decode_rows(out["logits"], vocab)):
                    placed[(r, reals[r][first + j])] = row
        if vocab is None:
            vocab = int(getattr(self.config, "vocab_size", 0) or 0)

        loss = None
        if labels is not None:
            loss = _logits.causal_lm_loss(kind, placed, _rows(labels)[0], vocab)
        shift = width - out_width
        shown = {(r, c - shift): row for (r, c), row in placed.items() if c >= shift}
        logits = _logits.assemble(kind, len(rows), out_width, vocab, shown)
        past = None
        if use_cache is not False:
            past = _logits.RemoteCache(sequences)
        if return_dict is False:
            return tuple(v for v in (loss, logits, past) if v is not None)
        return _logits.output(kind, loss, logits, past)

    __call__ = forward

    def generate(self, inputs=None, generation_config=None, streamer=None, **kwargs):
        input_ids = kwargs.pop("input_ids", inputs)
        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        mask = kwargs.pop("attention_mask", None)
        kind = _kind(input_ids)
        rows, flat = _rows(input_ids)
        gc = generation_config or self.generation_config

        def opt(k, default=None):
            return kwargs.pop(k) if kwargs.get(k) is not None else _gc(gc, k, default)

        if opt("num_beams", 1) != 1:
            raise NotImplementedError("rm_abstract: beam search (num_beams > 1) is not supported by the node agent")
        n_ret = int(opt("num_return_sequences", 1))
        width = len(rows[0]) if rows else 0
        # transformers: max_new_tokens wins over max_length, which counts the
        # (padded) prompt; arguments win over the model's generation_config.
        if kwargs.get("max_new_tokens") is not None:
            max_new = kwargs.pop("max_new_tokens")
        elif kwargs.get("max_length") is not None:
            max_new = int(kwargs.pop("max_length")) - width
        elif _gc(gc, "max_new_tokens") is not None:
            max_new = _gc(gc, "max_new_tokens")
        else:
            max_new = int(_gc(gc, "max_length", 20)) - width
        max_new = max(int(max_new), 0)
        do_sample = bool(opt("do_sample", False))
        eos = _ids(opt("eos_token_id"))
        pad = opt("pad_token_id")
        if pad is None:
            pad = eos[0] if eos else 0
        seed = kwargs.pop("seed", None)
        body = {"key": self.rm_key, "device": self.rm_device, "max_new_tokens": int(max_new), "do_sample": do_sample}
        penalty = float(opt("repetition_penalty", 1.0))
        if penalty != 1.0:
            body["repetition_penalty"] = penalty
        # min_new_tokens wins over min_length, which counts the prompt
        min_new = opt("min_new_tokens")
        if min_new is None:
            min_new = int(opt("min_length", 0)) - width
        if int(min_new) > 0:
            body["min_new_tokens"] = min(int(min_new), int(max_new))
        as_dict = bool(opt("return_dict_in_generate", False))
        if do_sample:
            body["temperature"] = float(opt("temperature", 1.0))
            top_k, top_p = opt("top_k", 50), opt("top_p", 1.0)
            if top_k:
                body["top_k"] = int(top_k)
            if top_p is not None and float(top_p) < 1.0:
                body["top_p"] = float(top_p)
            # transformers draws from torch's RNG, which differs per call;
            # a fresh seed keeps that (pass seed= to reproduce a run).
            body["seed"] = int(seed) if seed is not None else random.getrandbits(31)
        if eos:
            body["eos_token_id"] = eos
        # used above, or meaningless here (the agent keeps its own cache)
        for k in ("temperature", "top_k", "top_p", "max_length", "use_cache", "token_type_ids", "min_length"):
            kwargs.pop(k, None)
        ignored = sorted(k for k, v in kwargs.items() if not _neutral(k, v))
        if ignored:
            _log.warn_once("gen-ignored:" + ",".join(ignored), "generate(): ignoring what the node agent does not "
                           "support: %s (the output has the sequences only)" % ", ".join(ignored))
        _warn_unsupported_gc(gc)

        # Padding: the agent wants each prompt without pad tokens; the result
        # keeps the caller's rows as given, like transformers does.
        masks = _rows(mask)[0] if mask is not None else [[1] * len(r) for r in rows]
        prompts = [[t for t, m in zip(r, mk) if m] for r, mk in zip(rows, masks)]
        prompts = [p for p in prompts for _ in range(n_ret)]
        rows = [r for r in rows for _ in range(n_ret)]
        if max_new == 0:
            out = _as_kind(rows, kind, flat)
            return _logits.generate_output(kind, out) if as_dict else out
        body["input_ids"] = prompts

        if streamer is not None:
            ak = _array_kind(kind)
            streamer.put(_as_kind(rows, ak))
            result = self._client.generate(body, on_token=lambda ev: streamer.put(_as_kind([[ev["token_id"]]], ak, True)))
            streamer.end()
        else:
            result = self._client.generate(body)
        outs = [r + list(o["token_ids"]) for r, o in zip(rows, result["outputs"])]
        longest = max(len(o) for o in outs)
        outs = [o + [pad] * (longest - len(o)) for o in outs]
        if as_dict:
            return _logits.generate_output(kind, _as_kind(outs, kind, flat))
        return _as_kind(outs, kind, flat)
