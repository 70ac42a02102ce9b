"""TEST DOUBLE of optimum-rbln (tests only): RBLNAutoModelForCausalLM records
its from_pretrained arguments in save_pretrained()'s directory."""
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
