#!/usr/bin/env bash
# Benchmarks rm-agent on SmolLM2-135M (fetched once by e2e/fetch-smollm2.sh):
# tokens/s through the API vs candle in-process, prepare on a cache hit, API
# overhead per call, idle RSS. Release build.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
gguf=$(e2e/fetch-smollm2.sh | tail -n1)
cargo build --release -p rm-agent --bin rm-agent --example bench
RM_AGENT_BIN="$ROOT/target/release/rm-agent" "$ROOT/target/release/examples/bench" "$gguf" "${1:-64}"
