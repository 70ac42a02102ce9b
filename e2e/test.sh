#!/usr/bin/env bash
# Runs every test of rm-abstract: the Rust unit and integration tests (the
# latter against the local control plane, started or reused), the device
# plugin against the kubelet's own device manager, the Python
# init's tests against a real node agent, the vendor workers against SDK
# test doubles, the Helm chart's tests, and the
# full-stack demo as an end-to-end test (real pods on a real kubelet node),
# then faults on that node. Does the set-up first, so it works
# on a fresh machine.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

e2e/setup.sh
# an interpreter with torch, for the tests that compare with transformers itself
# (the agent's cpu-transformers worker, the Python init's torch pass)
RM_TORCH_PYTHON=$(e2e/python-env.sh torch)
export RM_TORCH_PYTHON
e2e/cluster.sh up >/dev/null
# A real node left by an earlier run would own the kubelet's device-plugin
# directory that the device manager tests need; the demo starts it again.
e2e/cluster.sh realnode-down

echo "=== Rust: cargo test --workspace"
cargo test --workspace --locked

echo "=== Device plugin against the kubelet's device manager: e2e/devicemanager.sh"
e2e/devicemanager.sh "${CARGO_TARGET_DIR:-$ROOT/target}/debug/rm-device-plugin"

echo "=== Python: python/run-tests.sh"
RM_AGENT_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/rm-agent" \
    RM_SERVE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/rm-serve" python/run-tests.sh

echo "=== Python: vendor workers with SDK test doubles (agent/tests/workers)"
python3 -m pytest -q -p no:cacheprovider agent/tests/workers

echo "=== Helm chart: e2e/chart-test.sh"
e2e/chart-test.sh

echo "=== end to end: e2e/demo.sh"
e2e/demo.sh

echo "=== real node faults: e2e/realnode-test.sh (after the demo's real path)"
e2e/realnode-test.sh
