# syntax=docker/dockerfile:1
# rm-device-plugin image. Build from the repository root:
#   docker build -f docker/device-plugin.Dockerfile -t ghcr.io/rm-abstract/device-plugin:0.1.0 .
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target directory between builds; the
# binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p rm-device-plugin \
 && install -D -m 0755 target/release/rm-device-plugin /out/rm-device-plugin

# glibc + libgcc only (ldd: libgcc_s, libm, libc); no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/rm-device-plugin /usr/local/bin/rm-device-plugin
# Non-root by default; the chart's DaemonSet runs it as uid 0 without any
# capability, because the kubelet's device-plugins directory is root-owned.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/rm-device-plugin"]
