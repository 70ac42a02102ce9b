# syntax=docker/dockerfile:1
# rm-serve image (the OpenAI-compatible server the operator runs for a served InferenceWorkload). Build from the repository root:
#   docker build -f docker/serve.Dockerfile -t ghcr.io/rm-abstract/serve:0.1.0 .
# Bases are build arguments, so that a machine without a registry can build
# from local ones (e2e/images.sh); the defaults are the public images.
ARG RUST_VERSION=1.95
ARG BUILD_IMAGE=rust:${RUST_VERSION}-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
# source: compile in the rust stage. prebuilt: take dist/rm-serve, built
# with `cargo build --release --locked` by the same toolchain outside.
ARG BINARIES=source

FROM ${BUILD_IMAGE} AS binaries-source
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target directory between builds; the
# binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p rm-serve \
 && install -D -m 0755 target/release/rm-serve /out/rm-serve

FROM scratch AS binaries-prebuilt
COPY dist/rm-serve /out/rm-serve

FROM binaries-${BINARIES} AS binaries

# glibc + libgcc only (ldd: libgcc_s, libm, libc); no shell, no package manager.
FROM ${RUNTIME_IMAGE}
COPY --from=binaries /out/rm-serve /usr/local/bin/rm-serve
# uid/gid 65532 (distroless "nonroot"); it writes nothing (read-only root filesystem is fine); it reaches the agent through the socket the device plugin mounts.
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/rm-serve"]
