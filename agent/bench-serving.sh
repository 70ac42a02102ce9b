#!/usr/bin/env bash
# Serving benchmark (issue 19): the release agent's continuous batching vs
# llama.cpp's own llama-server on SmolLM2-135M (GGUF, e2e/fetch-smollm2.sh),
# loopback only. 1, 4, 16 and 64 concurrent streaming clients, 64 new tokens
# each, greedy, EOS ignored, the same raw prompt texts to both (no chat
# template). Prints a table; not a test. Bounded in time (each server run
# under `timeout`).
#
#   agent/bench-serving.sh            # threads: RM_BENCH_THREADS or nproc
#   RM_BENCH_BATCH=16 RM_BENCH_CONCURRENCY=1,4,16,64 agent/bench-serving.sh
#
# llama-server is built once with cmake (-DLLAMA_CURL=OFF, target
# llama-server only) from the llama.cpp source llama-cpp-sys-2 vendors,
# copied to ~/.cache/rm-abstract/llama-server-<crate version>/, and cached
# there. The crate as published ships llama.cpp's libraries and `common`
# but not tools/server (only its README): then set LLAMA_CPP_SRC to a
# llama.cpp checkout of the same version, or the comparison is skipped and
# the agent is measured against itself with --cpu-max-batch 1 (the old,
# one-request-at-a-time behaviour).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { printf '[bench-serving] %s\n' "$*" >&2; }

threads=${RM_BENCH_THREADS:-$(nproc)}
batch=${RM_BENCH_BATCH:-16}
conc=${RM_BENCH_CONCURRENCY:-1,4,16,64}
new_tokens=${RM_BENCH_NEW_TOKENS:-64}
limit=${RM_BENCH_TIMEOUT:-900}
gguf=$(e2e/fetch-smollm2.sh | tail -n1)
ver=$(grep -A1 '^name = "llama-cpp-sys-2"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
cache="$HOME/.cache/rm-abstract/llama-server-$ver"
server_bin="$cache/bin/llama-server"

if [[ ! -x "$server_bin" ]]; then
    src=${LLAMA_CPP_SRC:-$(ls -d "$HOME"/.cargo/registry/src/*/llama-cpp-sys-2-"$ver"/llama.cpp 2>/dev/null | head -n1)}
    if [[ -n "$src" && -f "$src/tools/server/CMakeLists.txt" ]]; then
        log "building llama-server from $src into $cache (once)"
        mkdir -p "$cache/bin"
        rm -rf "$cache/src" && cp -a "$src" "$cache/src"
        cmake -S "$cache/src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
            -DGGML_NATIVE=ON >"$cache/cmake.log" 2>&1
        cmake --build "$cache/build" --target llama-server -j "$(nproc)" >>"$cache/cmake.log" 2>&1
        cp "$cache/build/bin/llama-server" "$server_bin"
    else
        log "llama-server not built: ${src:-no llama-cpp-sys-2-$ver source found} has no tools/server sources (the crate ships only its README); set LLAMA_CPP_SRC to a llama.cpp checkout of the vendored version to compare"
        server_bin=""
    fi
fi

cargo build --release -p rm-agent --bin rm-agent >&2
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

start_agent() { # name max_batch
    local dir="$work/$1"
    mkdir -p "$dir"
    RM_LOG=${RM_LOG:-warn} target/release/rm-agent --socket "$dir/agent.sock" --cache-dir "$dir/cache" \
        --model-path-allow "$(dirname "$gguf")" --min-free-disk 0 \
        --cpu-threads "$threads" --cpu-max-batch "$2" \
        --max-queued-per-namespace 256 --max-queued 256 >"$dir/log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do [[ -S "$dir/agent.sock" ]] && return 0; sleep 0.1; done
    log "the agent did not start: $(tail -n5 "$dir/log")"
    exit 1
}

llama_args=()
if [[ -n "$server_bin" ]]; then
    port=${RM_BENCH_PORT:-18089}
    # Same threads, $batch parallel slots in one unified KV cache, continuous
    # batching (its default), room for each slot's prompt + new tokens.
    "$server_bin" -m "$gguf" --host 127.0.0.1 --port "$port" -t "$threads" -tb "$threads" \
        --parallel "$batch" --cont-batching --kv-unified -c $((batch * 512)) -fa off \
        --no-webui >"$work/llama-server.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        sleep 0.2
    done
    llama_args=(--llama-url "http://127.0.0.1:$port")
fi

log "SmolLM2: $gguf; threads $threads; agent --cpu-max-batch $batch; clients $conc; $new_tokens new tokens"
start_agent batched "$batch"
timeout "$limit" python3 agent/bench_serving.py --agent-socket "$work/batched/agent.sock" \
    --agent-gguf "$gguf" --label "agent (batch $batch)" --concurrency "$conc" \
    --new-tokens "$new_tokens" "${llama_args[@]}"
if [[ -z "$server_bin" || -n "${RM_BENCH_BATCH1:-}" ]]; then
    log "the same agent with --cpu-max-batch 1 (requests one after another, as before issue 19)"
    start_agent serial 1
    # 64 clients one after another would take minutes on a small machine.
    timeout "$limit" python3 agent/bench_serving.py --agent-socket "$work/serial/agent.sock" \
        --agent-gguf "$gguf" --label "agent (batch 1)" --concurrency "${RM_BENCH_BATCH1_CONCURRENCY:-1,4,16}" \
        --new-tokens "$new_tokens"
fi
