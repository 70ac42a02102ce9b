"""Real HuggingFace scripts, unchanged, through a real agent (issue 18).

run-tests.sh runs this file twice: with the machine's python3, which has no
torch (a torch-free image), and with a venv that has torch 2.15.0 (an image
with torch). Each test says which it needs; every one checks the agent's
own request counters, so a script that quietly ran the model in its own
process fails.
"""
import json
import sys

import pytest

from conftest import (agent_counters, injected_env, make_tiny_gpt2, rm_lines, run_script, served,
                      transformers_itself)

try:
    import torch  # noqa: F401
    HAS_TORCH = True
except ImportError:
    HAS_TORCH = False

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs torch (the torch pass of run-tests.sh)")
torch_free = pytest.mark.skipif(HAS_TORCH, reason="a torch-free image (the python3 pass of run-tests.sh)")


def _last_json(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- any import order -----------------------------------------------------------------

IMPORTED_FIRST = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer   # before init(): a placeholder without torch
import transformers
Held = transformers.LlamaForCausalLM                           # a concrete class, held by the script
import rm_abstract
rm_abstract.init(device="cpu")
tok = AutoTokenizer.from_pretrained(sys.argv[1])
a = AutoModelForCausalLM.from_pretrained(sys.argv[1])
b = Held.from_pretrained(sys.argv[1])
ids = tok("Hello", return_tensors="np")
print(json.dumps({"a": type(a).__name__, "b": type(b).__name__,
                  "out": a.generate(**ids, max_new_tokens=4).tolist(), "out_b": b.generate(**ids, max_new_tokens=4).tolist()}))
"""


def test_classes_imported_before_init_load_through_the_agent(agent, tiny_model, tmp_path):
    """With or without torch: `from transformers import ...` before init()
    leaves the script holding the class (without torch, transformers'
    placeholder); init() must still catch it."""
    before = agent_counters(agent)
    env = injected_env(agent, RM_INJECTED=None)
    got = _last_json(run_script(tmp_path, IMPORTED_FIRST, env, args=[tiny_model]))
    assert got["a"] == got["b"] == "LlamaForCausalLM"  # the proxy, named after the architecture
    assert got["out"] == got["out_b"]
    assert served(before, agent_counters(agent)) == 2


# -- classes the agent cannot serve --------------------------------------------------

UNSERVABLE = """
import sys
import rm_abstract
rm_abstract.init()
from transformers import {cls}
try:
    m = {cls}.from_pretrained(sys.argv[1])
    print("LOADED", type(m).__module__.split(".")[0])
except rm_abstract.BackendNotAvailableError as e:   # the original library's class
    print("REFUSED", type(e).__name__)
"""


@pytest.mark.parametrize("cls", ["AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification", "AutoModel",
                                 "T5ForConditionalGeneration"])
def test_a_class_the_agent_cannot_serve_says_so(agent, tiny_model, tmp_path, cls):
    """The pod holds an NPU (RM_DEVICE=rbln:0): a class the agent cannot
    serve must not load silently on the pod's CPU."""
    before = agent_counters(agent)
    r = run_script(tmp_path, UNSERVABLE.format(cls=cls), injected_env(agent, RM_INJECTED=None, RM_DEVICE="rbln:0"),
                   args=[tiny_model])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["REFUSED", "RMUnavailableError"], r.stdout + r.stderr
    assert served(before, agent_counters(agent), "rm_agent_prepare_requests_total") == 0


@needs_torch
def test_fallback_loads_an_unservable_class_in_process_with_one_line(agent, tiny_model, tmp_path):
    r = run_script(tmp_path, UNSERVABLE.format(cls="AutoModelForSequenceClassification"),
                   injected_env(agent, RM_INJECTED=None, RM_DEVICE="rbln:0", RM_ON_UNAVAILABLE="fallback"),
                   args=[tiny_model])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["LOADED", "transformers"], r.stdout + r.stderr
    lines = [l for l in rm_lines(r.stderr) if "initialized with device" not in l]  # init()'s start-up line
    assert len(lines) == 1 and "AutoModelForSequenceClassification" in lines[0] and "falling back" in lines[0], lines


# -- torch scripts, as users write them ------------------------------------------------

TORCH_SCRIPT = """
import json, sys, torch
import rm_abstract
from transformers import AutoModelForCausalLM, AutoTokenizer
rm_abstract.init(device="cpu", verbose=False)
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32, device_map="auto",
                                             attn_implementation="sdpa")
inputs = tok("Hello world", return_tensors="pt").to(model.device)
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
zeros = torch.zeros(2, dtype=model.dtype, device=model.device)
print(json.dumps({"type": type(out.sequences).__name__, "dtype": str(out.sequences.dtype),
                  "ids": out.sequences.tolist(), "prompt": inputs["input_ids"].tolist(),
                  "zeros": str(zeros.dtype)}))
"""


@needs_torch
def test_pt_tensors_in_and_out_with_return_dict(agent, tiny_model, tmp_path):
    before = agent_counters(agent)
    r = run_script(tmp_path, TORCH_SCRIPT, injected_env(agent, RM_INJECTED=None), args=[tiny_model])
    got = _last_json(r)
    assert got["type"] == "Tensor" and got["dtype"] == "torch.int64" and got["zeros"] == "torch.float32"
    prompt = got["prompt"][0]
    assert got["ids"][0] == prompt + agent.direct_generate(tiny_model, [prompt], 6)[0]
    assert served(before, agent_counters(agent)) == 2  # the script's and the direct one
    # the placement arguments are named once, not silently dropped
    lines = rm_lines(r.stderr)
    assert any("ignoring attn_implementation, device_map" in l for l in lines), lines


PIPELINE_SCRIPT = """
import json, sys
import rm_abstract
rm_abstract.init(device="cpu", verbose=False)
from transformers import pipeline
pipe = pipeline("text-generation", model=sys.argv[1])
out = pipe("Hello world", max_new_tokens=6, do_sample=False, return_full_text=False)
print(json.dumps(out))
"""


@needs_torch
def test_text_generation_pipeline_quietly(agent, tiny_model, tmp_path):
    from transformers import AutoTokenizer
    before = agent_counters(agent)
    r = run_script(tmp_path, PIPELINE_SCRIPT, injected_env(agent, RM_INJECTED=None), args=[tiny_model])
    got = _last_json(r)
    assert "not supported for text-generation" not in r.stderr, r.stderr
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    prompt = tok("Hello world")["input_ids"]
    want = tok.decode(agent.direct_generate(tiny_model, [prompt], 6)[0], skip_special_tokens=True)
    assert got == [{"generated_text": want}]
    assert served(before, agent_counters(agent)) == 2


CHAT_SCRIPT = """
import json, sys, torch
import rm_abstract
rm_abstract.init(device="cpu", verbose=False)
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hello world"}]
inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
print(json.dumps({"prompt": inputs["input_ids"].tolist(), "ids": out.tolist(),
                  "reply": tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)}))
"""

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@needs_torch
def test_chat_template_script(agent, tiny_model, tmp_path):
    import shutil
    from transformers import AutoTokenizer
    d = tmp_path / "chat-model"
    shutil.copytree(tiny_model, d)
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(d))
    before = agent_counters(agent)
    got = _last_json(run_script(tmp_path, CHAT_SCRIPT, injected_env(agent, RM_INJECTED=None), args=[d]))
    prompt = got["prompt"][0]
    # the template really rendered (transformers' own rendering, tokenized)
    assert prompt == tok(tok.apply_chat_template([{"role": "system", "content": "You are brief."},
                                                  {"role": "user", "content": "Hello world"}],
                                                 add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)["input_ids"]
    assert got["ids"][0] == prompt + agent.direct_generate(d, [prompt], 5)[0]
    assert served(before, agent_counters(agent)) == 2


BATCH_SCRIPT = """
import json, sys, torch
import rm_abstract
rm_abstract.init(device="cpu", verbose=False)
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], padding_side="left")
tok.pad_token = tok.eos_token
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
batch = tok(["Hello", "The quick brown fox jumps"], padding=True, return_tensors="pt")
out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
print(json.dumps({"ids": out.tolist(), "mask": batch["attention_mask"].tolist(), "input": batch["input_ids"].tolist()}))
"""


@needs_torch
def test_batch_with_left_padding(agent, tiny_model, tmp_path):
    before = agent_counters(agent)
    got = _last_json(run_script(tmp_path, BATCH_SCRIPT, injected_env(agent, RM_INJECTED=None), args=[tiny_model]))
    assert got["mask"][0][0] == 0  # the short prompt really was padded
    for row, inp, mask in zip(got["ids"], got["input"], got["mask"]):
        real = [t for t, m in zip(inp, mask) if m]
        assert row[:len(inp)] == inp  # the caller's (padded) row, as transformers keeps it
        want = agent.direct_generate(tiny_model, [real], 4)[0]
        assert row[len(inp):len(inp) + len(want)] == want
    assert served(before, agent_counters(agent)) == 1 + 2


STREAMER_SCRIPT = """
import sys, torch
import rm_abstract
rm_abstract.init(device="cpu", verbose=False)
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
inputs = tok("Hello world", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=[],
                     streamer=TextStreamer(tok, skip_prompt=True))
print("FINAL:" + tok.decode(out[0][inputs["input_ids"].shape[1]:]))
"""


@needs_torch
def test_text_streamer(agent, tiny_model, tmp_path):
    before = agent_counters(agent)
    r = run_script(tmp_path, STREAMER_SCRIPT, injected_env(agent, RM_INJECTED=None), args=[tiny_model])
    assert r.returncode == 0, r.stderr
    streamed, final = r.stdout.split("FINAL:")
    assert final.strip() and streamed.strip() == final.strip()
    assert served(before, agent_counters(agent)) == 1


PENALTY_SCRIPT = """
import json, sys, torch
import rm_abstract
rm_abstract.init(device="cpu", verbose=False)
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor([[1, 17, 42, 99, 3]])
print(json.dumps({
    "plain": model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, min_new_tokens=12)[0].tolist(),
    "penalty": model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, min_new_tokens=12,
                              repetition_penalty=1.7)[0].tolist(),
    "min_new": model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=EOS, min_new_tokens=6)[0].tolist(),
}))
"""


@needs_torch
def test_repetition_penalty_and_min_new_tokens_match_transformers(agent, tiny_model, tmp_path, monkeypatch):
    """The agent's answers equal transformers' own generate() with the same
    arguments, on the same weights (torch, in this process)."""
    import torch
    from transformers import LlamaForCausalLM
    transformers_itself(monkeypatch)
    ref = LlamaForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 17, 42, 99, 3]])
    with torch.no_grad():
        first = int(ref(ids).logits[0, -1].argmax())  # make it the EOS: min_new_tokens must hold it off
        want = {
            "plain": ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, min_new_tokens=12)[0].tolist(),
            "penalty": ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, min_new_tokens=12,
                                    repetition_penalty=1.7)[0].tolist(),
            "min_new": ref.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=first, min_new_tokens=6,
                                    pad_token_id=0)[0].tolist(),
        }
    assert want["plain"] != want["penalty"]  # the penalty matters on this model
    before = agent_counters(agent)
    got = _last_json(run_script(tmp_path, PENALTY_SCRIPT.replace("EOS", str(first)),
                                injected_env(agent, RM_INJECTED=None), args=[tiny_model]))
    assert got == want
    assert served(before, agent_counters(agent)) == 3


# -- the original library's examples ---------------------------------------------------

# The statements of the original's examples/basic_usage.py, model path aside.
BASIC_USAGE = """
import rm_abstract
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    rm_abstract.init(device="auto", verbose=True)
    model_name = MODEL
    model = AutoModelForCausalLM.from_pretrained(model_name)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    inputs = tokenizer("Hello, I am a language model,", return_tensors="pt")
    outputs = model.generate(**inputs, max_length=50)
    print(tokenizer.decode(outputs[0], skip_special_tokens=True))
    print("\\nDevice Info:")
    print(rm_abstract.get_device_info())


if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_model, tmp_path_factory):
    pytest.importorskip("torch")
    return make_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2", tiny_model)


def _gpt2_backend_or_skip(agent):
    st, body = agent.call("GET", "/v1/backends")
    names = {b["name"]: b for b in body["backends"]}
    if not names.get("cpu-transformers", {}).get("available"):
        pytest.fail("the agent has no available cpu-transformers worker: %s" % names.get("cpu-transformers"))


@needs_torch
def test_original_basic_usage_on_a_gpt2(agent, tiny_gpt2, tmp_path, monkeypatch):
    """GPT-2 (the original examples' model; the built-in cpu backend has no
    GPT-2) is served by the agent's transformers worker on the node."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel
    _gpt2_backend_or_skip(agent)
    before = agent_counters(agent)
    r = run_script(tmp_path, BASIC_USAGE.replace("MODEL", repr(str(tiny_gpt2))), injected_env(agent, RM_INJECTED=None))
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("\nDevice Info:")[0].strip()
    transformers_itself(monkeypatch)
    ref = GPT2LMHeadModel.from_pretrained(str(tiny_gpt2)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_gpt2))
    inputs = tok("Hello, I am a language model,", return_tensors="pt")
    with torch.no_grad():
        want = tok.decode(ref.generate(**inputs, max_length=50)[0], skip_special_tokens=True)
    assert text == want
    assert "'device_type': 'cpu'" in r.stdout and "'backend'" in r.stdout
    lines = rm_lines(r.stderr)
    assert lines[0].startswith("rm_abstract: initialized with device auto"), lines
    assert any("via backend cpu-transformers" in l for l in lines), lines
    assert served(before, agent_counters(agent)) == 1


# The statements of the original's examples/device_switching.py: the model
# path, and the first device (gpu:0, which this node lacks) is cpu; the
# switch to rbln:0, which this node lacks too, must fail clearly.
DEVICE_SWITCHING = """
import rm_abstract
from transformers import AutoModelForCausalLM, AutoTokenizer

rm_abstract.init(device="cpu", verbose=True)

model_name = MODEL
tokenizer = AutoTokenizer.from_pretrained(model_name)

print("=" * 50)
print("Running on CPU...")
print("=" * 50)

model = AutoModelForCausalLM.from_pretrained(model_name)
inputs = tokenizer("GPU inference test:", return_tensors="pt")
outputs = model.generate(**inputs, max_length=30)
print(tokenizer.decode(outputs[0], skip_special_tokens=True))

print("\\n" + "=" * 50)
print("Switching to NPU...")
print("=" * 50)

rm_abstract.switch_device("rbln:0")

model = AutoModelForCausalLM.from_pretrained(model_name)
inputs = tokenizer("NPU inference test:", return_tensors="pt")
outputs = model.generate(**inputs, max_length=30)
print(tokenizer.decode(outputs[0], skip_special_tokens=True))
"""


@needs_torch
def test_original_device_switching_to_a_device_the_node_lacks(agent, tiny_gpt2, tmp_path):
    _gpt2_backend_or_skip(agent)
    before = agent_counters(agent)
    r = run_script(tmp_path, DEVICE_SWITCHING.replace("MODEL", repr(str(tiny_gpt2))),
                   injected_env(agent, RM_INJECTED=None))
    assert r.returncode == 1
    on_cpu = r.stdout.split("Running on CPU...")[1].split("Switching to NPU...")[0]
    assert [l for l in on_cpu.splitlines() if l.strip("=")], r.stdout  # the CPU part printed its text
    assert "NPU inference" not in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    print(last)
    assert last.startswith("rm_abstract.RMUnavailableError: cannot run %s on rbln:0: " % tiny_gpt2), last
    assert "RM_ON_UNAVAILABLE=fallback" in last
    assert served(before, agent_counters(agent)) == 1


# -- the original's API, whole --------------------------------------------------------

API_SCRIPT = """
import json
import rm_abstract
from rm_abstract.exceptions import RMAbstractError, NotInitializedError, InvalidDeviceError
before = {"backends": rm_abstract.get_available_backends(), "plugins": sorted(rm_abstract.list_plugins())}
try:
    rm_abstract.get_device_info()
    not_init = None
except NotInitializedError as e:
    not_init = str(e)
try:
    rm_abstract.init(device="tpu:0")
except InvalidDeviceError as e:
    bad = isinstance(e, RMAbstractError) and isinstance(e, ValueError)
c = rm_abstract.init(device="cpu", verbose=False)
info = rm_abstract.get_device_info()
system = rm_abstract.get_system_info().to_dict()
report = rm_abstract.validate_system(run_inference_tests=False)
print(json.dumps({"before": before, "not_init": not_init, "bad": bad, "device_name": c.device_name,
                  "backend": c.backend, "info": info, "system": system,
                  "report": [[t.name, t.status] for t in report.results], "passed": report.passed}))
"""


def test_the_original_api(agent, tmp_path):
    got = _last_json(run_script(tmp_path, API_SCRIPT, injected_env(agent, RM_INJECTED=None)))
    assert got["before"]["backends"]["cpu"] is True  # before init(): from the environment
    assert "cpu" in got["before"]["plugins"]
    assert got["not_init"] and got["bad"] is True
    assert got["device_name"] == "cpu:0" and got["backend"] == "cpu"
    info = got["info"]
    for k in ("device_type", "device_id", "name", "vendor", "memory_total", "memory_available"):
        assert k in info, k
    assert info["device_type"] == "cpu" and info["name"]  # the node's CPU, as the agent reads it
    with open("/proc/meminfo") as f:
        total = int(next(l for l in f if l.startswith("MemTotal:")).split()[1]) * 1024
    assert info["memory_total"] == total
    assert got["system"]["system"]["memory_total_bytes"] == total and got["system"]["error"] is None
    assert got["report"] == [["agent reachable", "pass"], ["identity", "pass"], ["backend for cpu", "pass"]]
    assert got["passed"] is True


def test_validate_system_reports_a_missing_agent(tmp_path):
    code = ("import rm_abstract\nr = rm_abstract.validate_system()\n"
            "print([(t.name, t.status) for t in r.results], r.passed)\n")
    r = run_script(tmp_path, code, injected_env(None, RM_INJECTED=None))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[('agent reachable', 'fail')] False"
