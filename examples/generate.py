"""An ordinary HuggingFace inference script, with nothing of rm-abstract in
it. Run in a pod of an InferenceWorkload, the injected init makes
`from_pretrained` and `generate` run on the node agent, on the device the
operator picked.

Usage: python generate.py MODEL_DIR [PROMPT]
"""
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir = sys.argv[1]
prompt = sys.argv[2] if len(sys.argv) > 2 else "The capital of France is"

tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
inputs = tokenizer(prompt, return_tensors="np")
output = model.generate(**inputs, max_new_tokens=12)
print(tokenizer.decode(output[0], skip_special_tokens=True))
