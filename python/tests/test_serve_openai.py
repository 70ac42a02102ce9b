"""rm-serve (issue 19) with the official `openai` client, against a real
agent: the tiny llama with a chat template, from a directory in the
"container" (uploaded as blobs), listed, completed, chatted with, streamed,
and a wrong model name is openai.NotFoundError."""
import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import SLOT_TOKEN, make_tiny_llama, workspace_binary

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def server(agent, tmp_path_factory):
    openai = pytest.importorskip("openai")
    d = make_tiny_llama(tmp_path_factory.mktemp("served") / "llama")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(agent.root / "serve.log", "wb")
    env = dict(os.environ, RM_SERVE_MODEL_SOURCE=str(d), RM_SERVE_MODEL_NAME="tiny", RM_DEVICE="cpu",
               RM_AGENT_SOCKET=str(agent.socket), RM_AGENT_SLOT_TOKEN=SLOT_TOKEN, RM_SERVE_PORT=str(port),
               RM_LOG="info")
    binary = workspace_binary("rm-serve", "RM_SERVE_BIN")
    proc = subprocess.Popen([str(binary)], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = "http://127.0.0.1:%d" % port
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(base + "/ready", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("rm-serve did not get ready; log: %s" % (agent.root / "serve.log").read_text())
        time.sleep(0.2)
    yield openai.OpenAI(base_url=base + "/v1", api_key="unused"), base
    proc.terminate()
    proc.wait(20)
    log.close()


def test_models_completions_and_chats_through_the_openai_client(server):
    client, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    c = client.completions.create(model="tiny", prompt="Hello world", max_tokens=5, temperature=0)
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.completion_tokens == 5 or c.choices[0].finish_reason == "stop"
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=6, temperature=0)
    text = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens > 0
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
    assert "".join(pieces) == text
    assert usage.completion_tokens == chat.usage.completion_tokens


def test_a_wrong_model_is_not_found_and_bad_params_are_400(server):
    import openai
    client, _ = server
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=7)
    assert e.value.body["param"] == "temperature"


def test_metrics_and_device_status(server):
    _, base = server
    with urllib.request.urlopen(base + "/metrics") as r:
        text = r.read().decode()
    assert "rm_serve_time_to_first_token_seconds_bucket" in text
    with urllib.request.urlopen(base + "/v1/devices/status") as r:
        st = json.loads(r.read())
    assert st["ready"] and st["running"]["device_type"] == "cpu"
