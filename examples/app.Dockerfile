# An ordinary HuggingFace inference image, with nothing of rm-abstract in it:
# Python, transformers and tokenizers (no torch, no vendor SDK) and the
# unchanged examples/generate.py. Run in a pod of an InferenceWorkload, the
# injected init sends from_pretrained and generate to the node agent.
#   docker build -f examples/app.Dockerfile -t hf-app .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
RUN python -m pip install --no-cache-dir --disable-pip-version-check transformers tokenizers numpy
COPY examples/generate.py /app/generate.py
# Any non-root user; Pod Security "restricted" requires one.
USER 1000:1000
WORKDIR /app
ENTRYPOINT ["python", "/app/generate.py"]
