#!/usr/bin/env bash
# Builds rm-abstract's four images and the demo's user image for real, with
# buildah (no daemon: vfs storage, chroot isolation), and loads them into the
# real node's containerd. No registry is reachable here, so the Dockerfiles'
# public bases are replaced by local ones made from this machine's Debian
# packages (build arguments; the Dockerfiles' defaults stay the public images):
#   cc       what gcr.io/distroless/cc-debian12 holds: glibc, libgcc, libstdc++,
#            libgomp, CA certificates, passwd with nonroot (65532); no shell
#   busybox  Debian's busybox-static (for the init image's `cp`)
#   python   Debian bookworm (debootstrap, minbase) with python3 and pip, the
#            shape of python:3.11-slim-bookworm (the user's image base)
# The Rust binaries are built here with cargo (release) and handed to the
# Dockerfiles' "prebuilt" stage (BINARIES=prebuilt); a registry build compiles
# them in the Dockerfiles' rust stage instead.
#
# Everything is cached by content under ~/.cache/rm-abstract/images: an
# unchanged tree rebuilds nothing (release binaries keyed by the sources,
# images by their Dockerfile, inputs and base).
#
#   e2e/images.sh build    build what changed; print each image's size
#   e2e/images.sh import   build, then import into the real node's containerd
#   e2e/images.sh refs     print NAME=IMAGE for each image (after build)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CACHE=${RM_E2E_CACHE:-$HOME/.cache/rm-abstract}
IMAGES="$CACHE/images"
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${RM_DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { printf '[images] %s\n' "$*" >&2; }
die() {
    printf '[images] error: %s\n' "$*" >&2
    exit 1
}

sha() { sha256sum | cut -c1-16; }
# Content of files (tracked and untracked, not ignored) under the given paths.
tree_key() { git ls-files -co --exclude-standard -z -- "$@" | sort -z | xargs -0 sha256sum | sha; }
size_mb() { awk -v b="$(stat -c %s "$1")" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }

# commit_rootfs REF DIR [buildah config flags...]: an image of one layer, DIR's contents.
commit_rootfs() {
    local ref=$1 dir=$2 c
    shift 2
    c=$(buildah from scratch)
    tar -C "$dir" -cf "$dir.tar" .
    buildah add "$c" "$dir.tar" / >/dev/null
    rm -f "$dir.tar"
    (($#)) && buildah config "$@" "$c"
    buildah commit -q --rm "$c" "$ref" >/dev/null
}

# present REF: whether buildah's store has the image.
present() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# passwd/group with root and nonroot (65532), as distroless has them.
write_users() {
    mkdir -p "$1/etc" "$1/tmp"
    chmod 1777 "$1/tmp"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$1/etc/passwd"
    printf 'root:x:0:\nnonroot:x:65532:\n' >"$1/etc/group"
    mkdir -p "$1/home/nonroot" && chown 65532:65532 "$1/home/nonroot"
}

# copy_packages DIR PKG...: the files of installed Debian packages (dpkg -L),
# without their documentation.
copy_packages() {
    local dir=$1 d
    shift
    # Debian 12's merged /usr: /lib, /lib64, /bin, /sbin are links into /usr.
    for d in lib lib64 bin sbin; do
        mkdir -p "$dir/usr/$d"
        [[ -e "$dir/$d" ]] || ln -s "usr/$d" "$dir/$d"
    done
    dpkg -L "$@" | grep -vE '^/usr/share/(doc|man|info|lintian|locale|gcc)' | sort -u |
        while read -r f; do [[ -L "$f" || -f "$f" ]] && echo "${f#/}"; done |
        tar -C / --no-recursion -cf - -T - | tar -C "$dir" --keep-directory-symlink -xf -
}

CC_PACKAGES=(libc6 libgcc-s1 libstdc++6 libgomp1)
base_cc() {
    local key ref
    key=$( (declare -f base_cc copy_packages write_users; dpkg-query -W "${CC_PACKAGES[@]}") | sha)
    ref="localhost/rm-abstract/base-cc:$key"
    if ! present "$ref"; then
        log "base cc: ${CC_PACKAGES[*]} and CA certificates from this machine's Debian packages"
        local dir
        dir=$(mktemp -d)
        copy_packages "$dir" "${CC_PACKAGES[@]}"
        write_users "$dir"
        install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
        commit_rootfs "$ref" "$dir" --env PATH=/usr/local/bin:/usr/bin:/bin --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
        rm -rf "$dir"
    fi
    echo "$ref"
}

base_busybox() {
    local key ref
    key=$( (declare -f base_busybox write_users; dpkg-query -W busybox-static) | sha)
    ref="localhost/rm-abstract/base-busybox:$key"
    if ! present "$ref"; then
        log "base busybox: Debian's busybox-static"
        local dir applet
        dir=$(mktemp -d)
        install -D -m 0755 /bin/busybox "$dir/bin/busybox"
        for applet in $(/bin/busybox --list); do
            [[ -e "$dir/bin/$applet" ]] || ln -s busybox "$dir/bin/$applet"
        done
        write_users "$dir"
        commit_rootfs "$ref" "$dir" --env PATH=/bin
        rm -rf "$dir"
    fi
    echo "$ref"
}

base_python() {
    local key ref
    key=$( (declare -f base_python; echo "$DEBIAN_SUITE $DEBIAN_MIRROR"; sha256sum /etc/ssl/certs/ca-certificates.crt) | sha)
    ref="localhost/rm-abstract/base-python:$key"
    if ! present "$ref"; then
        local dir start=$SECONDS
        dir=$(mktemp -d)
        log "base python: debootstrap --variant=minbase $DEBIAN_SUITE with python3 and pip (minutes, once)"
        debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
            "$DEBIAN_SUITE" "$dir" "$DEBIAN_MIRROR" >"$IMAGES/debootstrap.log" 2>&1 ||
            { tail -n 20 "$IMAGES/debootstrap.log" >&2; die "debootstrap failed; log: $IMAGES/debootstrap.log"; }
        # As python:3.11-slim: pip installs into the system Python, `python` exists.
        rm -f "$dir"/usr/lib/python3*/EXTERNALLY-MANAGED
        ln -sf python3 "$dir/usr/bin/python"
        # This machine's CA bundle (it may hold a proxy's CA that pip must trust).
        cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
        rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc "$dir"/usr/share/man
        commit_rootfs "$ref" "$dir" --env PATH=/usr/local/bin:/usr/bin:/bin --env LANG=C.UTF-8
        rm -rf "$dir"
        log "base python: built in $((SECONDS - start))s"
    fi
    echo "$ref"
}

# The operator, device plugin and agent, release build, cached by the content
# of the sources they are built from.
RUST_PATHS=(Cargo.toml Cargo.lock .cargo crds runtime operator device-plugin agent serve)
RELEASE_TARGET=${RM_IMAGES_TARGET_DIR:-$CACHE/target-release}
release_binaries() {
    local key dir
    key=$(tree_key "${RUST_PATHS[@]}")
    dir="$IMAGES/release-$key"
    if [[ ! -x "$dir/rm-agent" || ! -x "$dir/rm-serve" ]]; then
        local start=$SECONDS
        log "cargo build --release: rm-operator, rm-device-plugin, rm-agent, rm-serve (the first time many minutes; then what changed)"
        # A target directory of its own in the cache: a change to one crate
        # rebuilds that crate, not llama.cpp and every dependency (a clean
        # checkout, as CI's, has no target/).
        CARGO_TARGET_DIR="$RELEASE_TARGET" cargo build --release --locked \
            -p rm-operator -p rm-device-plugin -p rm-agent -p rm-serve >&2
        local target="$RELEASE_TARGET/release"
        mkdir -p "$dir.tmp"
        cp "$target/rm-operator" "$target/rm-device-plugin" "$target/rm-agent" "$target/rm-serve" "$dir.tmp/"
        rm -rf "$dir" && mv "$dir.tmp" "$dir"
        log "release binaries built in $((SECONDS - start))s"
    fi
    echo "$dir"
}

# build_image NAME DOCKERFILE KEY_INPUTS BUILD_ARGS...: buildah bud, cached
# by the Dockerfile, the given input key and the build arguments; saved as a
# docker-archive under $IMAGES. Prints the image reference.
build_image() {
    local name=$1 dockerfile=$2 inputs=$3
    shift 3
    local key ref archive
    key=$( (cat "$dockerfile"; echo "$inputs"; printf '%s\n' "$@") | sha)
    ref="localhost/rm-abstract/$name:$key"
    archive="$IMAGES/$name-$key.tar"
    if [[ ! -f "$archive" ]]; then
        local start=$SECONDS blog="$IMAGES/build-$name.log" args=() a
        for a in "$@"; do args+=(--build-arg "$a"); done
        log "$name: buildah bud -f $dockerfile (log: $blog)"
        # .build-context: only what the Dockerfiles copy, not target/ (gigabytes).
        if ! buildah bud --layers=false -f "$ROOT/$dockerfile" -t "$ref" "${args[@]}" "$CONTEXT" >"$blog" 2>&1; then
            tail -n 30 "$blog" >&2
            die "building $name failed; log: $blog"
        fi
        buildah push -q "$ref" "docker-archive:$archive.tmp:$ref" >/dev/null
        mv "$archive.tmp" "$archive"
        log "$name: built in $((SECONDS - start))s"
    fi
    printf '%s=%s %s\n' "$name" "$ref" "$archive"
}

# The build context: the repository's tracked and untracked files (not
# target/) plus dist/ with the prebuilt binaries.
make_context() {
    local bins=$1
    CONTEXT="$IMAGES/context"
    rm -rf "$CONTEXT"
    mkdir -p "$CONTEXT/dist"
    git ls-files -co --exclude-standard -z | xargs -0 cp -a --parents -t "$CONTEXT" 2>/dev/null || true
    cp "$bins"/rm-* "$CONTEXT/dist/"
}

# prune RELEASE_DIR: what earlier builds left (archives, binaries and
# buildah images not in $IMAGES/refs), so the cache does not grow with every
# change; the bases stay.
prune() {
    local keep=$1 f name ref
    for f in "$IMAGES"/release-*; do
        [[ "$f" == "$keep" ]] || rm -rf "$f"
    done
    for f in "$IMAGES"/*-*.tar; do
        [[ "$f" == */pause-* ]] && continue
        grep -qF " $f" "$IMAGES/refs" || rm -f "$f"
    done
    while read -r ref; do
        grep -qF "=$ref " "$IMAGES/refs" || buildah rmi -f "$ref" >/dev/null 2>&1 || true
    done < <(buildah images --format '{{.Name}}:{{.Tag}}' 2>/dev/null |
        grep -E '^localhost/rm-abstract/(operator|device-plugin|agent|serve|python-init|demo-app):' || true)
    # Stages of earlier builds that no image refers to any more, and the
    # containers that buildah 1.28 leaves on a stage chosen by a build
    # argument (FROM binaries-${BINARIES}; its --force-rm fails there).
    buildah containers --format '{{.ContainerID}} {{.ImageName}}' 2>/dev/null |
        awk 'NF == 1 {print $1}' | xargs -r buildah rm >/dev/null 2>&1 || true
    buildah rmi --prune >/dev/null 2>&1 || true
}

cmd_build() {
    command -v buildah >/dev/null || die "buildah is not installed (e2e/setup.sh installs it)"
    [[ $(id -u) -eq 0 ]] || die "building images with buildah (chroot isolation, vfs) needs root here"
    mkdir -p "$IMAGES"
    local cc busybox python bins start=$SECONDS
    cc=$(base_cc)
    busybox=$(base_busybox)
    python=$(base_python)
    bins=$(release_binaries)
    make_context "$bins"
    local bin_key init_key app_key
    bin_key=$(cat "$bins"/rm-* | sha)
    init_key=$(tree_key python/rm_abstract python/sitecustomize.py)
    app_key=$(sha256sum examples/generate.py | sha)
    {
        build_image operator docker/operator.Dockerfile "$bin_key" BINARIES=prebuilt "RUNTIME_IMAGE=$cc"
        build_image device-plugin docker/device-plugin.Dockerfile "$bin_key" BINARIES=prebuilt "RUNTIME_IMAGE=$cc"
        build_image agent docker/agent.Dockerfile "$bin_key" BINARIES=prebuilt "RUNTIME_IMAGE=$cc"
        build_image serve docker/serve.Dockerfile "$bin_key" BINARIES=prebuilt "RUNTIME_IMAGE=$cc"
        build_image python-init docker/python-init.Dockerfile "$init_key" "BUSYBOX_IMAGE=$busybox"
        build_image demo-app examples/app.Dockerfile "$app_key" "PYTHON_IMAGE=$python"
    } >"$IMAGES/refs.tmp"
    mv "$IMAGES/refs.tmp" "$IMAGES/refs"
    prune "$bins"
    log "images (uncompressed archive sizes), ready in $((SECONDS - start))s:"
    local name ref archive
    while read -r name archive; do
        ref=${name#*=}
        printf '  %-70s %s\n' "$ref" "$(size_mb "$archive")" >&2
    done <"$IMAGES/refs"
}

cmd_import() {
    cmd_build
    local name archive start=$SECONDS
    while read -r name archive; do
        "$ROOT/e2e/cluster.sh" import-image "$archive"
    done <"$IMAGES/refs"
    log "imported into the real node's containerd (k8s.io) in $((SECONDS - start))s"
}

case ${1:-} in
build) cmd_build ;;
import) cmd_import ;;
refs) awk '{print $1}' "$IMAGES/refs" ;;
*)
    sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
