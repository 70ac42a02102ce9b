#!/usr/bin/env bash
# Runs the Python tests of rm_abstract twice, as the two kinds of user image:
#   1. with the machine's python3, which has no torch (a torch-free image:
#      transformers' placeholder classes, numpy in and out);
#   2. with a venv that has torch 2.15.0 (python/requirements-torch.txt,
#      built once and cached by e2e/python-env.sh): "pt" tensors,
#      pipelines, streamers, transformers itself as the reference.
# Tests that need the other kind skip with the reason; each pass runs the
# whole file set. Exit code 5 from pytest ("no tests collected") counts as
# success. Extra arguments go to pytest.
# Called by e2e/test.sh. Env: PYTHON (default python3), RM_AGENT_BIN (a
# prebuilt rm-agent; otherwise the tests run `cargo build -p rm-agent`),
# RM_TORCH_PYTHON (an interpreter with torch; default: e2e/python-env.sh torch),
# RM_PY_PASSES (default "plain torch").
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# The package itself needs nothing; these are for the tests only.
"$PY" -m pip install --quiet --disable-pip-version-check \
    pytest transformers tokenizers safetensors numpy gguf openai==3.51.0 2>&1 | grep -v "Running pip as the 'root' user" >&2
if "$PY" -c 'import torch' 2>/dev/null; then
    echo "run-tests.sh: error: $PY has torch; the first pass must be a torch-free Python" >&2
    exit 1
fi

run_pass() {
    local name=$1 py=$2
    shift 2
    echo "run-tests.sh: pass '$name' with $py" >&2
    "$py" -m pytest -q -p no:cacheprovider "$@" tests
    local rc=$?
    if [[ $rc -eq 5 ]]; then
        echo "run-tests.sh: no tests collected (pytest exit 5), counted as success" >&2
        rc=0
    fi
    return $rc
}

status=0
for pass in ${RM_PY_PASSES:-plain torch}; do
    case $pass in
        plain) run_pass plain "$PY" "$@" || status=1 ;;
        torch)
            tpy=${RM_TORCH_PYTHON:-$(../e2e/python-env.sh torch)} || { status=1; continue; }
            RM_TORCH_PYTHON=$tpy run_pass torch "$tpy" "$@" || status=1
            ;;
        *) echo "run-tests.sh: unknown pass $pass (plain, torch)" >&2; status=1 ;;
    esac
done
exit $status
