#!/usr/bin/env bash
# Runs every test of rm-abstract: unit tests, and the integration tests
# against the local control plane (started, or reused when running). Does the
# set-up first, so it works on a fresh machine.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

e2e/setup.sh
e2e/cluster.sh up >/dev/null
cargo test --workspace --locked
