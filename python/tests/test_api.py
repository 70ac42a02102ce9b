"""The API in this process: settings, the seed's functions, generate()'s
transformers semantics, and what comes back for each input kind."""
import io
import contextlib

import pytest
from pathlib import Path

import rm_abstract
from rm_abstract.config import ConfigError, normalize_device, resolve


# -- settings: argument > env > default --------------------------------------------

@pytest.mark.parametrize("given,want", [("npu:0", "npu:0"), ("NPU:1", "npu:1"), ("gpu", "gpu"), ("cuda:0", "gpu:0"),
                                        ("rbln:0", "rbln:0"), ("furiosa:3", "furiosa:3"), ("cpu", "cpu"), ("auto", "auto")])
def test_device_strings(given, want):
    assert normalize_device(given) == want


@pytest.mark.parametrize("bad", ["tpu", "cpu:0", "npu:x", "", "gpu:-1", 3])
def test_bad_device_strings(bad):
    with pytest.raises(ConfigError):
        normalize_device(bad)


def test_argument_wins_over_env_and_env_over_default():
    env = {"RM_DEVICE": "rbln:0", "RM_COMPILE_OPTIONS": '{"precision": "fp16"}', "RM_VERBOSE": "0",
           "RM_ON_UNAVAILABLE": "fallback", "RM_AGENT_TOKEN": "t", "RM_USE_PLUGINS": "true", "RM_INJECTED": "1",
           "RM_POD_NAME": "p"}
    c = resolve(env=env)
    assert (c.device, c.compile_options, c.verbose, c.on_unavailable, c.token, c.use_plugin_system, c.injected) == \
        ("rbln:0", {"precision": "fp16"}, False, "fallback", "t", True, True)
    assert c.pod == {"name": "p"} and c.as_dict()["token"] == "<set>"
    c = resolve(device="cpu", compile_options={"maxSeqLen": 64}, verbose=True, on_unavailable="fail", env=env)
    assert (c.device, c.compile_options, c.verbose, c.on_unavailable) == ("cpu", {"maxSeqLen": 64}, True, "fail")
    c = resolve(env={})
    assert (c.device, c.socket, c.on_unavailable, c.verbose) == ("auto", "/var/run/rm-abstract/agent.sock", "fail", True)


# -- against the agent ----------------------------------------------------------------

@pytest.fixture(scope="module")
def model(agent, tiny_model):
    rm_abstract.init(device="cpu", agent_socket=str(agent.socket), verbose=False)
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(tiny_model))


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_seed_api(agent, model):
    assert rm_abstract.is_initialized()
    plugins = rm_abstract.list_plugins(available_only=True)
    assert plugins["cpu"]["display_name"] and plugins["cpu"]["priority"] == 0
    assert "cpu" in rm_abstract.get_available_backends()
    assert set(rm_abstract.list_plugins(available_only=False)) >= set(plugins)
    info = rm_abstract.get_device_info()
    assert info["device"] == "cpu" and info["backend"] == "cpu" and info["agent_reachable"]
    rm_abstract.switch_device("npu:0")
    assert rm_abstract.get_device_info()["device"] == "npu:0"
    rm_abstract.switch_device("cpu")


def test_proxy_looks_like_a_model(model):
    assert model.config.model_type == "llama" and model.config.vocab_size == 256
    assert model.generation_config.eos_token_id == 2
    assert model.eval() is model and model.to("cuda") is model and str(model.device) == "cpu"


def test_input_kinds_come_back_as_given(agent, tiny_model, model):
    import numpy as np
    prompt = [5, 6, 7]
    new = agent.direct_generate(tiny_model, [prompt], 4, eos_token_id=[999 % 256])[0]
    as_list = model.generate([prompt], max_new_tokens=4, eos_token_id=999 % 256)
    assert as_list == [prompt + new]
    as_np = model.generate(np.array([prompt]), max_new_tokens=4, eos_token_id=999 % 256)
    assert isinstance(as_np, np.ndarray) and as_np.dtype == np.int64 and as_np.tolist() == [prompt + new]
    assert model.generate(prompt, max_new_tokens=4, eos_token_id=999 % 256) == prompt + new  # 1-D in, 1-D out


def test_max_length_counts_the_prompt(model):
    out = model.generate([[5, 6, 7]], max_length=6, eos_token_id=[])
    assert len(out[0]) == 6
    assert len(model.generate([[5, 6, 7]], eos_token_id=[])[0]) == 20  # transformers' default max_length


def test_left_padding_and_attention_mask(agent, tiny_model, model, tok):
    a, b = [5, 6, 7, 8], [9, 10]
    direct = agent.direct_generate(tiny_model, [a, b], 5)
    pad = 0
    out = model.generate([a, [pad, pad] + b], attention_mask=[[1] * 4, [0, 0, 1, 1]], max_new_tokens=5, pad_token_id=pad)
    rows = [a + direct[0], [pad, pad] + b + direct[1]]
    width = max(map(len, rows))
    assert out == [r + [pad] * (width - len(r)) for r in rows]


def test_streamer_receives_tokens_as_they_arrive(model, tok):
    from transformers import TextStreamer
    ids = tok("Hello world", return_tensors="np")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = model.generate(**ids, max_new_tokens=6, streamer=TextStreamer(tok, skip_prompt=True))
    new = out[0][ids["input_ids"].shape[1]:]
    assert buf.getvalue().strip() == tok.decode(new).strip()


def test_sampling_is_seeded_and_varies(model):
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, eos_token_id=[])
    assert model.generate([[5, 6]], seed=3, **kw) == model.generate([[5, 6]], seed=3, **kw)
    runs = {tuple(model.generate([[5, 6]], **kw)[0]) for _ in range(4)}
    assert len(runs) > 1  # like transformers: a fresh draw per call


def test_num_return_sequences_and_unsupported(model):
    out = model.generate([[5, 6]], max_new_tokens=3, num_return_sequences=2, eos_token_id=[])
    assert len(out) == 2 and out[0] == out[1]
    with pytest.raises(NotImplementedError, match="beam"):
        model.generate([[5, 6]], num_beams=4)


def test_an_upload_the_agent_refuses_comes_back_with_its_reason(tmp_path):
    """The agent refuses an upload that cannot fit from its headers; the
    client asks first (Expect: 100-continue), so it reports the agent's
    reason, not a connection reset from a body sent into a closed socket."""
    import os
    from conftest import SLOT_TOKEN, Agent, workspace_binary
    from rm_abstract.client import AgentClient, AgentError, AgentUnavailable
    root = Path(os.environ.get("RM_TEST_TMP", "/tmp")) / ("rmpy-up-%d" % os.getpid())
    a = Agent(workspace_binary("rm-agent", "RM_AGENT_BIN"), root, extra_args=["--max-upload-bytes", "1M"])
    try:
        big = tmp_path / "model.safetensors"
        big.write_bytes(os.urandom(8 << 20))
        small = tmp_path / "config.json"
        small.write_bytes(b"{}")
        client = AgentClient(str(a.socket), token=SLOT_TOKEN)
        with pytest.raises(AgentError) as e:
            client.register_files([("config.json", str(small)), ("model.safetensors", str(big))])
        assert not isinstance(e.value, AgentUnavailable), e.value
        assert e.value.status == 413 and "--max-upload-bytes" in e.value.agent_message, e.value
        # An upload that fits still goes through the same path.
        from rm_abstract.client import file_sha256
        client._put_blob(file_sha256(str(small)), str(small))
        assert client._has_blob(file_sha256(str(small)))
    finally:
        a.stop()
        import shutil
        shutil.rmtree(root, ignore_errors=True)


# -- which classes go to the agent; from_pretrained's arguments ---------------------

@pytest.mark.parametrize("cls,want", [("AutoModelForCausalLM", True), ("LlamaForCausalLM", True),
                                      ("GPT2LMHeadModel", True), ("CTRLLMHeadModel", True),
                                      ("AutoModelForSeq2SeqLM", False), ("AutoModel", False),
                                      ("T5ForConditionalGeneration", False), ("Gemma3ForConditionalGeneration", False),
                                      ("BertForSequenceClassification", False), ("LlamaModel", False)])
def test_which_classes_the_agent_serves(cls, want):
    from rm_abstract.model import serves
    assert serves(cls) is want


def _options(compile_options, kwargs, gguf=False):
    from rm_abstract.config import Config
    from rm_abstract.model import _compile_options
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        opts = _compile_options(Config(compile_options=compile_options), "m", kwargs, gguf)
    return opts, err.getvalue()


@pytest.mark.parametrize("dtype,want", [("float16", "fp16"), ("bfloat16", "bf16"), ("float32", "fp32"),
                                        ("half", "fp16")])
def test_dtype_becomes_the_compile_precision(dtype, want):
    assert _options({}, {"torch_dtype": dtype}) == ({"precision": want}, "")
    assert _options({}, {"dtype": dtype})[0] == {"precision": want}


def test_dtype_auto_and_gguf_keep_the_default_and_the_workload_wins():
    assert _options({}, {"dtype": "auto"}) == ({}, "")
    assert _options({}, {"dtype": "float16"}, gguf=True) == ({}, "")
    opts, err = _options({"precision": "q8_0"}, {"torch_dtype": "bfloat16"})
    assert opts == {"precision": "q8_0"} and "dtype bfloat16 ignored" in err and "precision q8_0" in err


def test_placement_arguments_are_named_once():
    opts, err = _options({}, {"device_map": "auto", "quantization_config": object(), "revision": "main",
                              "_from_pipeline": "text-generation"})
    assert opts == {}
    lines = err.splitlines()
    assert len(lines) == 1 and "ignoring device_map, quantization_config" in lines[0] and "q8_0 or q4" in lines[0]
    assert _options({}, {"device_map": "auto", "quantization_config": 1})[1] == ""  # once per process
