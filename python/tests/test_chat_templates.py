"""The agent's chat templates against transformers' apply_chat_template
(issue 19): the same text and the same token ids, for SmolLM2's real
template (from its GGUF) and for a template with a system message, loop
controls and Python string methods on the tiny llama."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, make_tiny_llama

# A system message, loop controls, Python methods, raise_exception: what
# real templates use.
TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'].strip() %}"
    "{% set rest = messages[1:] %}{% else %}{% set sys = 'You are helpful.' %}{% set rest = messages %}{% endif %}"
    "[SYS] {{ sys }}\n"
    "{% for m in rest %}\n"
    "  {% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}\n"
    "  {% if m['content'].startswith('skip') %}{% continue %}{% endif %}\n"
    "{{ m['role'].upper() }}: {{ m['content'] }}{{ eos_token if m['role'] == 'assistant' else '' }}\n"
    "  {% if loop.index >= 4 %}{% break %}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

CHATS = [
    [{"role": "user", "content": "Hello world"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hello again, world!"}, {"role": "user", "content": "skip me"},
     {"role": "user", "content": "The capital of France?"}, {"role": "assistant", "content": "Paris"},
     {"role": "user", "content": "never reached"}],
]


def _ids(out):
    # transformers 5 answers a BatchEncoding with return_dict's default
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def _prepared(agent, path):
    st, reg = agent.call("POST", "/v1/models", {"source": {"path": str(path)}})
    assert st == 200, reg
    st, prep = agent.call("POST", "/v1/prepare", {"model": reg["model"], "device": "cpu"})
    assert st == 200, prep
    return prep["key"]


def _compare(agent, key, tok, chats, template=None):
    for chat in chats:
        for gen in (True, False):
            st, r = agent.call("POST", "/v1/render", {"key": key, "messages": chat, "add_generation_prompt": gen})
            assert st == 200, r
            text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen, chat_template=template)
            ids = _ids(tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, chat_template=template))
            assert r["prompt"] == text
            assert r["input_ids"] == ids


def test_a_template_with_system_and_loop_controls_matches_transformers(agent, tmp_path):
    from transformers import AutoTokenizer
    d = make_tiny_llama(tmp_path / "chat-llama")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    key = _prepared(agent, d)
    _compare(agent, key, AutoTokenizer.from_pretrained(str(d)), CHATS)
    # raise_exception is a 400 with the template's words.
    st, r = agent.call("POST", "/v1/render", {"key": key, "messages": [{"role": "tool", "content": "x"}]})
    assert st == 400 and "unknown role tool" in r["error"]["message"], r
    # generate with messages runs the rendered ids.
    st, out = agent.call("POST", "/v1/generate", {"key": key, "device": "cpu", "messages": CHATS[1], "max_new_tokens": 3})
    assert st == 200, out
    st, r = agent.call("POST", "/v1/render", {"key": key, "messages": CHATS[1]})
    assert out["usage"]["prompt_tokens"] == len(r["input_ids"])


def test_a_model_without_template_is_400(agent, tiny_model):
    key = _prepared(agent, tiny_model)
    st, r = agent.call("POST", "/v1/render", {"key": key, "messages": CHATS[0]})
    assert st == 400 and "no chat template" in r["error"]["message"], r


def test_smollm2s_real_template_matches_transformers(agent, tmp_path):
    r = subprocess.run(["bash", str(REPO / "e2e" / "fetch-smollm2.sh")], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not r.stdout.strip():
        pytest.skip("SmolLM2 not available: %s" % r.stderr.strip()[-300:])
    gguf_path = r.stdout.strip().splitlines()[-1]
    import gguf
    from transformers import AutoTokenizer
    template = gguf.GGUFReader(gguf_path).fields["tokenizer.chat_template"].contents()
    d = tmp_path / "smollm2-hf"
    r = subprocess.run([sys.executable, str(REPO / "e2e" / "smollm2-hf-dir.py"), gguf_path, str(d)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    key = _prepared(agent, gguf_path)
    chats = CHATS[:1] + [[{"role": "system", "content": "Answer in French."},
                          {"role": "user", "content": "What is the capital of France?"}]]
    _compare(agent, key, AutoTokenizer.from_pretrained(str(d)), chats, template=template)
