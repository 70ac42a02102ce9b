"""The shipped vendor workers pass `options.extra` to their SDK only as the
manifest's typed allow-list says (rm_worker.typed_extras).

Each test runs a real worker program (agent/workers/<name>/worker.py) over
the worker protocol, with the SDK TEST DOUBLES of sdk-test-doubles/ on
PYTHONPATH instead of the vendor SDK; the doubles record the arguments the
SDK would have received. Standard library + pytest only; no agent binary.

Run: python3 -m pytest -q agent/tests/workers   (e2e/test.sh does)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORKERS = HERE.parents[1] / "workers"
SDK_TEST_DOUBLES = HERE / "sdk-test-doubles"
RECORD = "test-double-call.json"


def run_worker(name, requests, env_extra=None):
    """Runs workers/<name>/worker.py on `requests` (then shutdown) and
    answers {id: final message}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RM_")}
    env["PYTHONPATH"] = str(SDK_TEST_DOUBLES)
    env.update(env_extra or {})
    lines = [json.dumps({"id": i + 1, "method": m, "params": p}) for i, (m, p) in enumerate(requests)]
    lines.append(json.dumps({"id": 0, "method": "shutdown", "params": {}}))
    proc = subprocess.run([sys.executable, str(WORKERS / name / "worker.py")], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=60, env=env, cwd=WORKERS / name)
    assert proc.returncode == 0, proc.stderr
    final = {}
    for line in proc.stdout.splitlines():
        msg = json.loads(line)
        if "result" in msg or "error" in msg:
            final[msg["id"]] = msg
    assert len(final) == len(requests), (proc.stdout, proc.stderr)
    return final


def compile_params(tmp_path, extra, **options):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return {"key": "k", "model_path": str(model), "model_format": "safetensors", "output_dir": str(out),
            "device_type": "furiosa", "devices": [], "options": dict(options, extra=extra)}


def recorded(params):
    path = Path(params["output_dir"]) / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def test_furiosa_extras_reach_artifact_builder_typed(tmp_path):
    p = compile_params(tmp_path, {"max_prompt_len": "512", "calculate_logit_only_for_last_token": "true",
                                  "pipeline_parallel_size": "2"}, tensorParallelSize=4, maxSeqLen=1024)
    out = run_worker("furiosa", [("hello", {"protocol": 1}), ("compile", p)])
    hello = out[1]["result"]
    assert hello["available"] and hello["compiler_version"] == "furiosa-llm-0.0.0+test-double", hello
    assert "result" in out[2], out[2]
    call = recorded(p)
    assert call["call"] == "ArtifactBuilder"
    assert call["kwargs"] == {"tensor_parallel_size": 4, "max_seq_len_to_capture": 1024, "max_prompt_len": 512,
                              "calculate_logit_only_for_last_token": True, "pipeline_parallel_size": 2}
    # Typed as the manifest says, not the strings the agent sends.
    assert call["types"] == {"tensor_parallel_size": "int", "max_seq_len_to_capture": "int", "max_prompt_len": "int",
                             "calculate_logit_only_for_last_token": "bool", "pipeline_parallel_size": "int"}


@pytest.mark.parametrize("allow", [None, "0", "true"])
def test_furiosa_refuses_trust_remote_code_unless_the_agent_allows_it(tmp_path, allow):
    p = compile_params(tmp_path, {"trust_remote_code": "true"})
    out = run_worker("furiosa", [("compile", p)], {"RM_ALLOW_TRUST_REMOTE_CODE": allow} if allow else None)
    err = out[1].get("error")
    assert err and err["kind"] == "invalid_request", out
    assert "trust_remote_code" in err["message"] and "--allow-trust-remote-code" in err["message"], err
    assert recorded(p) is None, "ArtifactBuilder must not be called"


def test_furiosa_passes_trust_remote_code_as_a_bool_when_the_agent_allows_it(tmp_path):
    p = compile_params(tmp_path, {"trust_remote_code": "true"})
    out = run_worker("furiosa", [("compile", p)], {"RM_ALLOW_TRUST_REMOTE_CODE": "1"})
    assert "result" in out[1], out
    assert recorded(p)["kwargs"] == {"trust_remote_code": True}


@pytest.mark.parametrize("extra, why", [
    ({"num_hidden_layers": "1"}, "not an option"),
    ({"revision": "main"}, "not an option"),
    ({"max_prompt_len": "512.0"}, "not an integer"),
    ({"max_prompt_len": "0"}, "below the minimum"),
    ({"calculate_logit_only_for_last_token": "1"}, "not true or false"),
])
def test_furiosa_refuses_undeclared_keys_and_bad_values(tmp_path, extra, why):
    p = compile_params(tmp_path, extra)
    out = run_worker("furiosa", [("compile", p)])
    err = out[1].get("error")
    assert err and err["kind"] == "invalid_request" and why in err["message"], out
    assert list(extra)[0] in err["message"]
    assert recorded(p) is None


def test_furiosa_extras_cannot_override_what_the_agent_maps(tmp_path):
    # Not declared in the manifest, and set from maxSeqLen: refused either way.
    p = compile_params(tmp_path, {"max_seq_len_to_capture": "8"}, maxSeqLen=1024)
    out = run_worker("furiosa", [("compile", p)])
    assert out[1]["error"]["kind"] == "invalid_request", out
    assert recorded(p) is None


def test_rbln_extras_reach_from_pretrained_typed(tmp_path):
    p = compile_params(tmp_path, {"rbln_npu": "RBLN-CA25", "rbln_create_runtimes": "false",
                                  "rbln_attn_impl": "flash_attn", "rbln_kvcache_partition_len": "16384"},
                       batchSize=1, maxSeqLen=4096)
    out = run_worker("rbln", [("compile", p)], {"RM_DEVICES": "2"})
    assert "result" in out[1], out
    assert recorded(p)["kwargs"] == {"export": True, "rbln_batch_size": 1, "rbln_max_seq_len": 4096,
                                     "rbln_device": 2, "rbln_npu": "RBLN-CA25", "rbln_create_runtimes": False,
                                     "rbln_attn_impl": "flash_attn", "rbln_kvcache_partition_len": 16384}


@pytest.mark.parametrize("extra", [{"rbln_device": "0"}, {"rbln_npu": "RBLN-XX99"}, {"trust_remote_code": "true"}])
def test_rbln_refuses_undeclared_keys_and_bad_values(tmp_path, extra):
    p = compile_params(tmp_path, extra)
    out = run_worker("rbln", [("compile", p)], {"RM_DEVICES": "2", "RM_ALLOW_TRUST_REMOTE_CODE": "1"})
    err = out[1].get("error")
    assert err and err["kind"] == "invalid_request", out
    assert recorded(p) is None


def generate_params(tmp_path, **sampling):
    art = tmp_path / "artifact"
    art.mkdir(exist_ok=True)
    p = {"max_new_tokens": 4, "do_sample": False, "temperature": 1.0, "top_p": None, "top_k": None, "seed": 0,
         "eos_token_ids": [], "stop_at_eos": True}
    p.update(sampling)
    return {"key": "k", "artifact_dir": str(art), "devices": [], "prompts": [[5, 6, 7]], "params": p}


def recorded_generate(params):
    path = Path(params["artifact_dir"]) / RECORD
    return json.loads(path.read_text())["kwargs"] if path.exists() else None


def test_furiosa_passes_repetition_penalty_and_min_tokens_to_sampling_params(tmp_path):
    g = generate_params(tmp_path, repetition_penalty=1.2, min_new_tokens=2)
    out = run_worker("furiosa", [("generate", g)])
    assert out[1]["result"]["outputs"][0]["token_ids"] == [1, 2], out
    sp = recorded_generate(g)
    assert sp["repetition_penalty"] == 1.2 and sp["min_tokens"] == 2, sp
    # Absent: off, as the SDK's own defaults.
    off = tmp_path / "off"
    off.mkdir()
    g = generate_params(off)
    out = run_worker("furiosa", [("generate", g)])
    sp = recorded_generate(g)
    assert sp["repetition_penalty"] == 1.0 and sp["min_tokens"] == 0, sp


@pytest.mark.parametrize("bad", [{"repetition_penalty": 0}, {"min_new_tokens": -2}])
def test_furiosa_refuses_bad_penalties_before_the_sdk(tmp_path, bad):
    g = generate_params(tmp_path, **bad)
    out = run_worker("furiosa", [("generate", g)])
    err = out[1].get("error")
    assert err and err["kind"] == "invalid_request" and list(bad)[0] in err["message"], out
    assert recorded_generate(g) is None


def test_rbln_passes_repetition_penalty_and_min_new_tokens_to_generate(tmp_path):
    pytest.importorskip("torch", reason="the rbln worker builds its inputs with torch")
    g = generate_params(tmp_path, repetition_penalty=1.5, min_new_tokens=3)
    out = run_worker("rbln", [("generate", g)])
    assert out[1]["result"]["outputs"][0]["token_ids"] == [1, 2], out
    kw = recorded_generate(g)
    assert kw == {"max_new_tokens": 4, "do_sample": False, "repetition_penalty": 1.5, "min_new_tokens": 3}, kw
