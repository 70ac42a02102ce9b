#!/usr/bin/env bash
# Issue 9's benchmark: the agent's cpu backend side by side with llama.cpp
# (llama-cpp-python, built natively once into a venv under
# ~/.cache/rm-abstract), on SmolLM2-135M Q4_1 and the agent's Q8_0 compile of
# it. Prints a markdown table. THREADS=2 by default. NATIVE=1 also builds
# rm-agent for this very CPU (RUSTFLAGS=-C target-cpu=native, so llama.cpp
# builds with GGML_NATIVE, as the reference is) into target/native and adds
# its rows: the same engine, compiled like the reference.
#   [NATIVE=1] [RUNS=5] [CANDLE=0] e2e/bench/cpu-engine.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
LLAMA_CPP_PYTHON=0.3.36
VENV=${RM_LLAMA_CPP_PYTHON_VENV:-"$HOME/.cache/rm-abstract/llama-cpp-python-$LLAMA_CPP_PYTHON"}
log() { printf '[cpu-engine] %s\n' "$*" >&2; }

if ! "$VENV/bin/python" -c 'import llama_cpp, numpy' 2>/dev/null; then
    log "building llama-cpp-python $LLAMA_CPP_PYTHON natively into $VENV (several minutes, once)"
    python3 -m venv "$VENV"
    CMAKE_ARGS="-DGGML_NATIVE=ON" "$VENV/bin/pip" install -q --no-cache-dir \
        "llama-cpp-python==$LLAMA_CPP_PYTHON" numpy
fi
gguf=$(e2e/fetch-smollm2.sh | tail -n1)
log "building rm-agent (release)"
cargo build -q --release --locked -p rm-agent --bin rm-agent
native=()
if [[ ${NATIVE:-0} == 1 ]]; then
    log "building rm-agent for this CPU (target-cpu=native) into target/native"
    RUSTFLAGS="-C target-cpu=native" cargo build -q --release --locked -p rm-agent --bin rm-agent \
        --target-dir "$ROOT/target/native"
    native=("$ROOT/target/native/release/rm-agent")
fi
python3 e2e/bench/cpu_engine.py "$ROOT/target/release/rm-agent" "$VENV/bin/python" "$gguf" "${native[@]}"
