# syntax=docker/dockerfile:1
# rm-device-plugin image. Build from the repository root:
#   docker build -f docker/device-plugin.Dockerfile -t ghcr.io/rm-abstract/device-plugin:0.1.0 .
# Bases are build arguments, so that a machine without a registry can build
# from local ones (e2e/images.sh); the defaults are the public images.
ARG RUST_VERSION=1.95
ARG BUILD_IMAGE=rust:${RUST_VERSION}-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
# source: compile in the rust stage. prebuilt: take dist/rm-device-plugin, built
# with `cargo build --release --locked` by the same toolchain outside.
ARG BINARIES=source

FROM ${BUILD_IMAGE} AS binaries-source
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target directory between builds; the
# binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p rm-device-plugin \
 && install -D -m 0755 target/release/rm-device-plugin /out/rm-device-plugin

FROM scratch AS binaries-prebuilt
COPY dist/rm-device-plugin /out/rm-device-plugin

FROM binaries-${BINARIES} AS binaries

# glibc + libgcc only (ldd: libgcc_s, libm, libc); no shell, no package manager.
FROM ${RUNTIME_IMAGE}
COPY --from=binaries /out/rm-device-plugin /usr/local/bin/rm-device-plugin
# Non-root by default; the chart's DaemonSet runs it as uid 0 without any
# capability, because the kubelet's device-plugins directory is root-owned.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/rm-device-plugin"]
