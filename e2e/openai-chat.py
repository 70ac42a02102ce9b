"""The official openai client against a served InferenceWorkload, unchanged
but for base_url: list the models, then one streamed chat completion.
Used by e2e/demo.sh.
    python3 e2e/openai-chat.py BASE_URL MODEL
"""
import sys

from openai import OpenAI

base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key="not-used")
print("  models:", [m.id for m in client.models.list().data])
stream = client.chat.completions.create(model=model, stream=True, max_tokens=24, temperature=0,
                                        messages=[{"role": "user", "content": "Name a colour."}])
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
print("  chat, streamed:", repr(text))
if not text.strip():
    sys.exit("the served model's chat answer was empty")
