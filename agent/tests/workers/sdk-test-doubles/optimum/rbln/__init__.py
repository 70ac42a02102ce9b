"""TEST DOUBLE of optimum-rbln (tests only): RBLNAutoModelForCausalLM records
its from_pretrained arguments in save_pretrained()'s directory, and its
generate arguments (transformers' generate keywords) in the artifact
directory, answering two fixed tokens after the prompt."""
from sdk_test_double_record import record

__version__ = "0.0.0+test-double"


class RBLNAutoModelForCausalLM:
    def __init__(self, model, kwargs):
        self.model, self.kwargs = model, kwargs

    @classmethod
    def from_pretrained(cls, model_id, **kwargs):
        return cls(model_id, kwargs)

    def save_pretrained(self, save_dir):
        record(save_dir, "RBLNAutoModelForCausalLM.from_pretrained", self.model, self.kwargs)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        import torch
        record(self.model, "RBLNAutoModelForCausalLM.generate", self.model, kwargs)
        return torch.cat([input_ids, torch.tensor([[1, 2]])], dim=1)
