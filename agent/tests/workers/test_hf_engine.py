"""The shared transformers engine (agent/workers/common/hf_engine.py) turns
the protocol's generation params into transformers generate() arguments
with the agent's meanings; optional fields that are absent are off, and bad
values are refused (invalid_request), never dropped. No torch needed: the
engine imports it only to load a model. (The engine against the real
transformers: agent/tests/cpu_transformers.rs.)

Run: python3 -m pytest -q agent/tests/workers   (e2e/test.sh does)
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "workers" / "common"))
import hf_engine  # noqa: E402
from rm_worker import WorkerError  # noqa: E402


def params(**over):
    p = {"max_new_tokens": 8, "do_sample": False, "temperature": 1.0, "top_p": None, "top_k": None, "seed": 0,
         "eos_token_ids": [], "stop_at_eos": True}
    p.update(over)
    return p


def test_greedy_without_the_optional_fields_sets_nothing_else():
    assert hf_engine.generate_kwargs(params()) == {"max_new_tokens": 8, "do_sample": False}


def test_sampling_eos_and_ignore_eos_keep_their_meanings():
    kw = hf_engine.generate_kwargs(params(do_sample=True, temperature=0.7, top_p=0.9, top_k=20,
                                          eos_token_ids=[2, 3], stop_at_eos=False))
    assert kw == {"max_new_tokens": 8, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
                  "eos_token_id": [2, 3], "min_new_tokens": 8}


def test_repetition_penalty_and_min_new_tokens_reach_generate():
    kw = hf_engine.generate_kwargs(params(repetition_penalty=1.3, min_new_tokens=3))
    assert kw["repetition_penalty"] == 1.3 and kw["min_new_tokens"] == 3
    # 1.0 and 0 are off; a minimum above the maximum is the maximum.
    kw = hf_engine.generate_kwargs(params(repetition_penalty=1.0, min_new_tokens=0))
    assert "repetition_penalty" not in kw and "min_new_tokens" not in kw
    assert hf_engine.generate_kwargs(params(min_new_tokens=50))["min_new_tokens"] == 8


@pytest.mark.parametrize("bad", [{"repetition_penalty": 0}, {"repetition_penalty": -1.5},
                                 {"repetition_penalty": "1.2"}, {"repetition_penalty": True},
                                 {"repetition_penalty": float("nan")}, {"min_new_tokens": -1},
                                 {"min_new_tokens": 2.5}, {"min_new_tokens": True}])
def test_bad_values_are_refused_naming_the_field(bad):
    with pytest.raises(WorkerError) as e:
        hf_engine.generate_kwargs(params(**bad))
    assert e.value.kind == "invalid_request"
    assert next(iter(bad)) in str(e.value)


def test_a_python_without_torch_is_told_apart():
    reason = hf_engine.missing_packages()
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        assert reason is None
    except ImportError:
        assert reason.startswith("cannot import ") and "--worker-python" in reason
