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
# llama-server is built once by agent/build-llama-server.sh from the
# llama.cpp source that llama-cpp-sys-2 vendors (plus its tools/server
# sources, which the crate leaves out), with the agent's ggml flags, and
# cached. RM_BENCH_LLAMA_SERVER=0 skips it; then, or when it cannot be
# built, the agent is measured against itself with --cpu-max-batch 1 (the
# old one-request-at-a-time behaviour). RM_BENCH_BATCH1=1 adds that run to
# the comparison; RM_BENCH_EXACT=1 adds the agent with --cpu-exact-batching
# (against llama-server again, in a pass of its own).
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
server_bin=""
if [[ ${RM_BENCH_LLAMA_SERVER:-1} != 0 ]]; then
    server_bin=$(agent/build-llama-server.sh) || {
        log "llama-server could not be built (above); measuring the agent against itself"
        server_bin=""
    }
fi

cargo build --release -p rm-agent --bin rm-agent >&2
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

start_agent() { # name max_batch [agent args...]
    local dir="$work/$1" max_batch=$2
    shift 2
    mkdir -p "$dir"
    RM_LOG=${RM_LOG:-warn} target/release/rm-agent --socket "$dir/agent.sock" --cache-dir "$dir/cache" \
        --model-path-allow "$(dirname "$gguf")" --min-free-disk 0 \
        --cpu-threads "$threads" --cpu-max-batch "$max_batch" \
        --max-queued-per-namespace 256 --max-queued 256 "$@" >"$dir/log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do [[ -S "$dir/agent.sock" ]] && return 0; sleep 0.1; done
    log "the agent did not start: $(tail -n5 "$dir/log")"
    exit 1
}

llama_args=()
if [[ -n "$server_bin" ]]; then
    port=${RM_BENCH_PORT:-18089}
    # Same threads, $batch parallel slots with continuous batching, room
    # for each slot's prompt + new tokens; the rest (KV layout, flash
    # attention) at llama-server's own defaults, its best guess for this
    # machine.
    "$server_bin" -m "$gguf" --host 127.0.0.1 --port "$port" -t "$threads" -tb "$threads" \
        --parallel "$batch" --cont-batching -c $((batch * 512)) \
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
if [[ -n "${RM_BENCH_EXACT:-}" ]]; then
    log "the same agent with --cpu-exact-batching (each sequence's logits as alone)"
    start_agent exact "$batch" --cpu-exact-batching
    timeout "$limit" python3 agent/bench_serving.py --agent-socket "$work/exact/agent.sock" \
        --agent-gguf "$gguf" --label "agent (batch $batch, exact)" --concurrency "$conc" \
        --new-tokens "$new_tokens" "${llama_args[@]}"
fi
if [[ -z "$server_bin" || -n "${RM_BENCH_BATCH1:-}" ]]; then
    log "the same agent with --cpu-max-batch 1 (requests one after another, as before issue 19)"
    start_agent serial 1
    # 64 clients one after another would take minutes on a small machine.
    timeout "$limit" python3 agent/bench_serving.py --agent-socket "$work/serial/agent.sock" \
        --agent-gguf "$gguf" --label "agent (batch 1)" --concurrency "${RM_BENCH_BATCH1_CONCURRENCY:-1,4,16}" \
        --new-tokens "$new_tokens"
fi
