# syntax=docker/dockerfile:1
# rm-operator image. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/rm-abstract/operator:0.1.0 .
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target directory between builds; the
# binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p rm-operator \
 && install -D -m 0755 target/release/rm-operator /out/rm-operator

# glibc + libgcc only (ldd: libgcc_s, libm, libc); no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/rm-operator /usr/local/bin/rm-operator
# uid/gid 65532 (distroless "nonroot"); the chart runs it with a read-only root filesystem.
USER 65532:65532
EXPOSE 8080 9443
ENTRYPOINT ["/usr/local/bin/rm-operator"]
