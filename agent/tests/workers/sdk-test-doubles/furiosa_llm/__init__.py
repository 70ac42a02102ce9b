"""TEST DOUBLE of furiosa-llm (tests only): no compiler, no NPU.

LLM.load_artifact + generate record the SamplingParams they were given in
the artifact directory and answer two fixed tokens per prompt.
SamplingParams takes only the keyword arguments furiosa-llm documents
(developer.furiosa.ai, furiosa_llm.SamplingParams, 2026.x), so a worker
passing anything else fails here as it would on the SDK."""
from sdk_test_double_record import record

__version__ = "0.0.0+test-double"

_DOCUMENTED = {"n", "best_of", "repetition_penalty", "temperature", "top_p", "top_k", "min_p", "stop",
               "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "use_beam_search", "length_penalty",
               "early_stopping", "max_tokens", "min_tokens", "skip_special_tokens", "logprobs", "prompt_logprobs",
               "output_kind", "structured_outputs", "extra_args"}


class SamplingParams:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - _DOCUMENTED
        if unknown:
            raise TypeError("SamplingParams got unexpected keyword arguments %s" % sorted(unknown))
        self.kwargs = kwargs


class _Completion:
    def __init__(self):
        self.token_ids, self.text, self.finish_reason = [1, 2], "", "length"


class _RequestOutput:
    def __init__(self, prompt):
        self.prompt_token_ids = prompt if isinstance(prompt, list) else []
        self.outputs = [_Completion()]


class LLM:
    def __init__(self, artifact_dir, **kwargs):
        self.artifact_dir = artifact_dir

    @classmethod
    def load_artifact(cls, artifact_dir, **kwargs):
        return cls(artifact_dir, **kwargs)

    def generate(self, prompts, sampling_params):
        record(self.artifact_dir, "LLM.generate", self.artifact_dir, sampling_params.kwargs)
        return [_RequestOutput(p.get("prompt_token_ids") if isinstance(p, dict) else p) for p in prompts]
