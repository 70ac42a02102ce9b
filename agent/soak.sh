#!/usr/bin/env bash
# Soak test of rm-agent (issue 17): builds the release agent, then runs
# agent/soak.py against it on a temporary unix socket (loopback only, bounded
# in time and request count). Arguments go to soak.py (--seconds 120,
# --max-requests, --tenants, -v, --keep, ...; see `agent/soak.py --help`).
#
# Env: CARGO_TARGET_DIR (default ~/.cache/rm-abstract/target-release),
# PYTHON (default python3), SOAK_GGUF: a GGUF one more tenant serves by node
# path (default: SmolLM2-135M when e2e/fetch-smollm2.sh has already cached
# it; nothing is downloaded here; "none" to leave it out).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/rm-abstract/target-release}
cargo build --release -p rm-agent --bin rm-agent
PY=${PYTHON:-python3}
gguf=${SOAK_GGUF:-}
if [[ -z "$gguf" ]]; then
    cached="${RM_SMOLLM2_CACHE:-$HOME/.cache/rm-abstract/smollm2}/unpacked"
    gguf=$(find "$cached" -name '*.gguf' -type f 2>/dev/null | sort | head -n1 || true)
fi
args=()
if [[ -n "$gguf" && "$gguf" != none ]]; then
    args+=(--gguf "$gguf")
fi
# A copy of this build: other worktrees may build into the same target
# directory (and replace release/rm-agent) while the soak runs.
bindir=$(mktemp -d "${TMPDIR:-/tmp}/rm-soak-bin.XXXXXX")
trap 'rm -rf "$bindir"' EXIT
cp "$CARGO_TARGET_DIR/release/rm-agent" "$bindir/rm-agent"
"$PY" agent/soak.py --agent "$bindir/rm-agent" "${args[@]}" "$@"
