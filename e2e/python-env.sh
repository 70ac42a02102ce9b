#!/usr/bin/env bash
# Prints the path of a Python interpreter with the packages of
# python/requirements-<name>.txt, creating its venv the first time.
#   e2e/python-env.sh torch   -> .../py-torch-<hash>/bin/python
# The venv lives under ~/.cache/rm-abstract (override: RM_PYENV_CACHE), named
# by a hash of the requirements file and the base interpreter's version, so a
# changed pin builds a new one and an unchanged one is reused as is. It is
# built beside its final name and renamed when complete: a run killed halfway
# leaves nothing that looks usable. Old venvs of the same name are removed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
name=${1:?usage: e2e/python-env.sh <name> (python/requirements-<name>.txt)}
req="$ROOT/python/requirements-$name.txt"
[[ -f $req ]] || { echo "[python-env] error: no $req" >&2; exit 1; }
CACHE=${RM_PYENV_CACHE:-"$HOME/.cache/rm-abstract"}
base=${PYTHON:-python3}
key=$({ cat "$req"; "$base" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)
dir="$CACHE/py-$name-$key"
if [[ -x $dir/bin/python ]]; then
    echo "$dir/bin/python"
    exit 0
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.py-$name.lock"
flock 9
if [[ ! -x $dir/bin/python ]]; then
    start=$SECONDS
    echo "[python-env] creating the '$name' venv from $(basename "$req") (torch: ~3.5 GB download, ~2 min)" >&2
    tmp="$dir.tmp"
    rm -rf "$tmp"
    "$base" -m venv "$tmp"
    "$tmp/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -r "$req" >&2
    # scripts in bin/ name the temporary path in their #! line; we only ever
    # run `bin/python -m ...`, which does not care where the venv lives
    for old in "$CACHE"/py-"$name"-*; do
        [[ $old == "$tmp" || ! -d $old ]] || rm -rf "$old"
    done
    mv "$tmp" "$dir"
    echo "[python-env] '$name' venv ready in $((SECONDS - start)) s: $dir ($(du -sh "$dir" | cut -f1))" >&2
fi
echo "$dir/bin/python"
