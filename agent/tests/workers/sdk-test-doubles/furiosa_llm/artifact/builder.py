"""TEST DOUBLE of furiosa_llm.artifact.builder (tests only): ArtifactBuilder
records its arguments in build()'s output directory and builds nothing."""
from sdk_test_double_record import record


class ArtifactBuilder:
    def __init__(self, model_id_or_path, name="", **kwargs):
        self.model = model_id_or_path
        self.kwargs = kwargs

    def build(self, save_dir, **_):
        record(save_dir, "ArtifactBuilder", self.model, self.kwargs)
