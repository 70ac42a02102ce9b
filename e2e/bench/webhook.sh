#!/usr/bin/env bash
# Benchmarks of the rm-operator admission webhook.
#  1. handler time per pod (criterion; prints p50/p99 per pod), no cluster;
#  2. pod creation through the local control plane (e2e/cluster.sh), with and
#     without the webhook, RM_BENCH_PODS (default 500) each, interleaved:
#     prints the median added latency.
# Usage: e2e/bench/webhook.sh [handler|apiserver|all]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/../.."
what="${1:-all}"
if [[ "$what" == handler || "$what" == all ]]; then
  cargo bench -p rm-operator --bench webhook -- --noplot 2>&1 | grep -E "webhook handler|mutate_pod|time:"
fi
if [[ "$what" == apiserver || "$what" == all ]]; then
  # Release: the webhook runs inside the test process, as optimized as the
  # shipped rm-operator.
  RM_WEBHOOK_TEST_LOG=info cargo test --release -p rm-operator --test webhook_on_cluster -- --ignored --nocapture \
    bench_pod_creation_latency_with_and_without_webhook 2>&1 | grep -E "pod create|test result"
fi
