# syntax=docker/dockerfile:1
# rm-agent image. Build from the repository root:
#   docker build -f docker/agent.Dockerfile -t ghcr.io/rm-abstract/agent:0.1.0 .
# Bases are build arguments, so that a machine without a registry can build
# from local ones (e2e/images.sh); the defaults are the public images.
ARG RUST_VERSION=1.95
ARG BUILD_IMAGE=rust:${RUST_VERSION}-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
# source: compile in the rust stage. prebuilt: take dist/rm-agent, built
# with `cargo build --release --locked` by the same toolchain outside.
ARG BINARIES=source

FROM ${BUILD_IMAGE} AS binaries-source
# llama.cpp (the cpu engine for GGUF) builds with cmake; bindgen needs libclang.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cmake libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target directory between builds; the
# binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p rm-agent \
 && install -D -m 0755 target/release/rm-agent /out/rm-agent

FROM scratch AS binaries-prebuilt
COPY dist/rm-agent /out/rm-agent

FROM binaries-${BINARIES} AS binaries

# glibc, libgcc, libstdc++ and libgomp (llama.cpp's C++ and OpenMP), all in
# distroless/cc; no shell, no package manager.
FROM ${RUNTIME_IMAGE}
COPY --from=binaries /out/rm-agent /usr/local/bin/rm-agent
# The external worker backends (Python programs driven over stdin/stdout) for
# images that add a vendor SDK on top of this one: --plugin-dir /opt/rm-abstract/workers.
# This image itself carries no Python and no SDK: it runs the built-in cpu backend.
COPY agent/workers /opt/rm-abstract/workers
# Non-root by default; the chart's DaemonSet runs it as uid 0 (root-owned host
# directories; privileged only with agent.accelerators.enabled).
USER 65532:65532
EXPOSE 9100
ENTRYPOINT ["/usr/local/bin/rm-agent"]
