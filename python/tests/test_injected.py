"""Unchanged user scripts, run as `python script.py` with only the injected
env + PYTHONPATH, against a real rm-agent, compared with the agent directly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PYTHON_DIR, REPO, injected_env, rm_lines, run_script

# The script from the issue, untouched except for printing its result.
USER_SCRIPT = """
import json, sys
from transformers import AutoTokenizer, AutoModelForCausalLM
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d)
inputs = tok("Hello", return_tensors="np")
out = model.generate(**inputs, max_new_tokens=8)
print(json.dumps({"type": type(out).__name__, "ids": out.tolist(), "prompt": inputs["input_ids"].tolist(),
                  "text": tok.decode(out[0])}))
"""

MANUAL_SCRIPT = "import rm_abstract; rm_abstract.init(device=\"cpu\")\n" + USER_SCRIPT


def _result(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_unchanged_script_gives_the_agents_tokens(agent, tiny_model, tmp_path):
    r = run_script(tmp_path, USER_SCRIPT, injected_env(agent), args=[tiny_model])
    got = _result(r)
    assert got["type"] == "ndarray"
    prompt = got["prompt"][0]
    direct = agent.direct_generate(tiny_model, [prompt], 8)[0]
    assert got["ids"][0] == prompt + direct
    assert len(direct) == 8 or direct[-1] == 2  # 8 new tokens unless EOS came first
    assert any("via backend cpu" in l for l in rm_lines(r.stderr)), r.stderr


# A script that scores and decodes by hand: model(**inputs).logits.
LOGITS_SCRIPT = """
import json, sys
from transformers import AutoTokenizer, AutoModelForCausalLM
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d)
inputs = tok("Hello", return_tensors="np")
logits = model(**inputs).logits
print(json.dumps({"shape": list(logits.shape), "next": int(logits[0, -1].argmax()),
                  "prompt": inputs["input_ids"].tolist()}))
"""


def test_unchanged_script_reads_logits(agent, tiny_model, tmp_path):
    got = _result(run_script(tmp_path, LOGITS_SCRIPT, injected_env(agent), args=[tiny_model]))
    prompt = got["prompt"][0]
    assert got["shape"] == [1, len(prompt), 256]
    assert got["next"] == agent.direct_generate(tiny_model, [prompt], 1)[0][0]


def test_second_run_uses_the_cache_and_uploads_nothing(agent, tiny_model, tmp_path):
    run_script(tmp_path, USER_SCRIPT, injected_env(agent), args=[tiny_model])
    r = run_script(tmp_path, USER_SCRIPT, injected_env(agent), args=[tiny_model])
    _result(r)
    lines = rm_lines(r.stderr)
    assert not any("uploading" in l for l in lines), lines
    assert any("(cached)" in l for l in lines), lines


def test_manual_one_line_form(agent, tiny_model, tmp_path):
    # outside Kubernetes: no RM_INJECTED, the script adds the one line itself
    env = injected_env(agent, RM_INJECTED=None, RM_DEVICE=None)
    r = run_script(tmp_path, MANUAL_SCRIPT, env, args=[tiny_model])
    got = _result(r)
    assert got["ids"][0] == got["prompt"][0] + agent.direct_generate(tiny_model, got["prompt"], 8)[0]


def test_quiet_when_not_verbose(agent, tiny_model, tmp_path):
    r = run_script(tmp_path, USER_SCRIPT, injected_env(agent, RM_VERBOSE="0"), args=[tiny_model])
    _result(r)
    assert rm_lines(r.stderr) == []


def test_not_injected_means_not_active(agent, tiny_model, tmp_path):
    # PYTHONPATH carries our sitecustomize, but RM_INJECTED is unset: transformers
    # behaves exactly as without us. (Without torch that is its own "requires
    # PyTorch" error; with torch, its generate() refusing numpy input.)
    r = run_script(tmp_path, USER_SCRIPT, injected_env(agent, RM_INJECTED=None), args=[tiny_model])
    plain = run_script(tmp_path, USER_SCRIPT, injected_env(agent, RM_INJECTED=None, PYTHONPATH=None),
                       args=[tiny_model])
    assert r.returncode == plain.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1]
    assert rm_lines(r.stderr) == []
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "PyTorch" in r.stderr


# -- failure modes: one clear line, behaviour as documented ----------------------

TOKENIZER_ONLY = """
from transformers import AutoTokenizer
import sys
print(AutoTokenizer.from_pretrained(sys.argv[1])("Hello")["input_ids"])
"""


def _last_line(stderr):
    return [l for l in stderr.strip().splitlines() if l.strip()][-1]


def test_agent_missing_fails_clearly_by_default(tiny_model, tmp_path):
    env = injected_env(None)
    r = run_script(tmp_path, USER_SCRIPT, env, args=[tiny_model])
    assert r.returncode == 1
    last = _last_line(r.stderr)
    assert last.startswith("rm_abstract.RMUnavailableError: cannot run"), r.stderr
    assert "no agent socket at /nonexistent/agent.sock" in last and "RM_ON_UNAVAILABLE=fallback" in last
    # a program that loads no model is untouched
    r = run_script(tmp_path, TOKENIZER_ONLY, env, args=[tiny_model])
    assert r.returncode == 0 and rm_lines(r.stderr) == [], r.stderr


def test_agent_missing_fallback_warns_once_and_runs_transformers(tiny_model, tmp_path):
    r = run_script(tmp_path, USER_SCRIPT, injected_env(None, RM_ON_UNAVAILABLE="fallback"), args=[tiny_model])
    lines = rm_lines(r.stderr)
    assert len(lines) == 1 and "falling back to transformers in this process" in lines[0], r.stderr
    # then exactly what the program does without rm_abstract (without torch,
    # transformers' "requires PyTorch"; with it, its generate() refusing numpy)
    plain = run_script(tmp_path, USER_SCRIPT, injected_env(None, PYTHONPATH=None), args=[tiny_model])
    assert r.returncode == plain.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1]


def test_agent_equals_transformers_itself_when_torch_is_there(agent, tiny_model, monkeypatch):
    """transformers' own LlamaForCausalLM (the torch pass of run-tests.sh) on
    the tiny model: the agent's greedy tokens and logits are the same."""
    torch = pytest.importorskip("torch")
    import numpy as np
    import rm_abstract
    from transformers import LlamaForCausalLM
    monkeypatch.setattr(rm_abstract._state, "active", False)  # transformers' own loader, in this process
    model = LlamaForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    assert isinstance(model, torch.nn.Module)
    ids = [1, 17, 42, 99, 3]
    with torch.no_grad():
        want_logits = model(torch.tensor([ids])).logits[0].numpy()
        want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              min_new_tokens=12)[0, len(ids):].tolist()
    assert agent.direct_generate(tiny_model, [ids], 12, ignore_eos=True)[0] == want
    np.testing.assert_allclose(agent.direct_forward(tiny_model, [ids])[0], want_logits, atol=1e-4)


def test_stale_socket_is_reported(tiny_model, tmp_path):
    import socket
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # bound, never listening: like a socket left by a dead agent
    try:
        r = run_script(tmp_path, USER_SCRIPT, injected_env(None, RM_AGENT_SOCKET=str(path)), args=[tiny_model])
    finally:
        s.close()
    assert r.returncode == 1
    assert "refuses connections" in _last_line(r.stderr), r.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(), reason="needs root to run a client as 'nobody'")
def test_socket_without_permission_is_reported(agent, tmp_path):
    # The agent's socket is 0660 root: user 'nobody' may not connect. System
    # Python (pyenv's lives under /root) and no transformers: the load path
    # is called directly with the same arguments a hook would pass.
    code = ("import rm_abstract, sys\nfrom rm_abstract.model import load\nrm_abstract.init(device='cpu')\n"
            "try:\n    load(rm_abstract._state, 'AutoModelForCausalLM', '/models/x', {}, None)\n"
            "except rm_abstract.RMUnavailableError as e:\n    print(e)\n")
    env = injected_env(agent, RM_INJECTED=None)
    r = subprocess.run(["/usr/bin/python3", "-c", code], env=env, capture_output=True, text=True, cwd="/",
                       preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "is not accessible (permission denied" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("var,value,expect", [
    ("RM_DEVICE", "tpu:0", "device 'tpu:0' is not one of"),
    ("RM_COMPILE_OPTIONS", "{precision: q8}", "RM_COMPILE_OPTIONS is not valid JSON"),
    ("RM_COMPILE_OPTIONS", "[1]", "RM_COMPILE_OPTIONS must be a JSON object"),
    ("RM_ON_UNAVAILABLE", "maybe", "must be 'fail' or 'fallback'"),
    ("RM_VERBOSE", "loud", "RM_VERBOSE='loud' is not a boolean"),
])
def test_bad_env_is_one_line_and_model_loads_fail(agent, tiny_model, tmp_path, var, value, expect):
    env = injected_env(agent, **{var: value})
    r = run_script(tmp_path, TOKENIZER_ONLY, env, args=[tiny_model])
    assert r.returncode == 0, r.stderr  # the program itself is not broken
    lines = rm_lines(r.stderr)
    assert len(lines) == 1 and expect in lines[0] and "from_pretrained will fail" in lines[0], r.stderr
    r = run_script(tmp_path, USER_SCRIPT, env, args=[tiny_model])
    assert r.returncode == 1 and "not configured" in _last_line(r.stderr) and expect in _last_line(r.stderr), r.stderr


def test_option_the_agent_refuses_is_its_message(agent, tiny_model, tmp_path):
    env = injected_env(agent, RM_COMPILE_OPTIONS=json.dumps({"precision": "int8"}))
    r = run_script(tmp_path, USER_SCRIPT, env, args=[tiny_model])
    assert r.returncode == 1
    assert "rm_abstract.RMUnavailableError: cannot run" in _last_line(r.stderr) and "int8" in _last_line(r.stderr), r.stderr


def test_compile_options_reach_the_agent(agent, tiny_model, tmp_path):
    env = injected_env(agent, RM_COMPILE_OPTIONS=json.dumps({"precision": "bf16", "maxSeqLen": 128}))
    _result(run_script(tmp_path, USER_SCRIPT, env, args=[tiny_model]))
    st, cache = agent.call("GET", "/v1/cache")
    assert any(e["options"].get("precision") == "bf16" for e in cache["entries"]), cache


# -- sitecustomize chaining ---------------------------------------------------------

IMAGE_SITE = "import os\nprint('image sitecustomize ran', flush=True)\nIMAGE_VALUE = 42\n"


@pytest.mark.parametrize("injected", ["1", None])
def test_chains_to_the_images_sitecustomize(agent, tmp_path, injected):
    image = tmp_path / "image-site"
    image.mkdir()
    (image / "sitecustomize.py").write_text(IMAGE_SITE)
    env = injected_env(agent, RM_INJECTED=injected, PYTHONPATH="%s:%s" % (PYTHON_DIR, image))
    code = "import sitecustomize, rm_abstract, sys\nprint('value', sitecustomize.IMAGE_VALUE, 'active', rm_abstract.is_initialized())\n"
    r = run_script(tmp_path, code, env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["image sitecustomize ran", "value 42 active %s" % (injected == "1")]


def test_broken_image_sitecustomize_is_one_line(agent, tmp_path):
    image = tmp_path / "image-site"
    image.mkdir()
    (image / "sitecustomize.py").write_text("raise RuntimeError('image bug')\n")
    env = injected_env(agent, PYTHONPATH="%s:%s" % (PYTHON_DIR, image))
    r = run_script(tmp_path, "import rm_abstract\nprint(rm_abstract.is_initialized())\n", env)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
    assert rm_lines(r.stderr) == ["rm_abstract: the image's sitecustomize failed (RuntimeError: image bug); continuing"]


# -- every Python on the machine -------------------------------------------------------

def _pythons():
    found = {}
    root = Path("/root/.pyenv/versions")
    for p in sorted(root.glob("3.*/bin/python3")) if root.exists() else []:
        found[p.parent.parent.name] = p
    for v in range(6, 15):
        for d in ("/usr/bin", "/usr/local/bin"):
            p = Path(d) / ("python3.%d" % v)
            if p.exists():
                found.setdefault("%s/python3.%d" % (d, v), p)
    return sorted(found.items())


@pytest.mark.parametrize("name,python", _pythons() or [pytest.param("none", None, marks=pytest.mark.skip("no other Pythons"))])
def test_imports_on_every_python(name, python, tmp_path):
    ver = subprocess.run([str(python), "-c", "import sys; print(sys.version_info[1])"], capture_output=True, text=True)
    minor = int(ver.stdout)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(PYTHON_DIR), "RM_INJECTED": "1", "RM_DEVICE": "cpu"}
    code = "import sys\nm = sys.modules.get('rm_abstract')\nprint('active' if m and m.is_initialized() else 'inactive')\n"
    if minor >= 9:
        code += "import rm_abstract\nrm_abstract.init(device='npu:0')\nprint(rm_abstract.get_device_info()['device'])\n"
    r = run_script(tmp_path, code, env, python=str(python), timeout=60)
    assert r.returncode == 0, r.stderr
    if minor >= 9:
        # init() says the device once (verbose is the default), nothing else
        assert r.stdout.split() == ["active", "npu:0"], r.stderr
        assert rm_lines(r.stderr) == ["rm_abstract: initialized with device npu:0 (node agent at "
                                      "/var/run/rm-abstract/agent.sock)"], r.stderr
    else:  # unsupported: one line, the program runs without us
        assert r.stdout.split() == ["inactive"]
        assert rm_lines(r.stderr) == ["rm_abstract: not active: Python 3.%d is older than 3.9; the program runs without rm_abstract" % minor]
