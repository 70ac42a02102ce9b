# syntax=docker/dockerfile:1
# The init image that the admission webhook injects: it holds the stdlib-only
# rm_abstract package and sitecustomize.py under /rm-abstract/, and a `cp`
# (the init container runs `cp -r /rm-abstract/. /rm-abstract-inject/` as uid 65532).
#   docker build -f docker/python-init.Dockerfile -t ghcr.io/rm-abstract/python-init:0.1.0 .

# The base is a build argument, so that a machine without a registry can
# build from a local one (e2e/images.sh); the default is the public image.
ARG BUSYBOX_IMAGE=busybox:1.37-musl

FROM ${BUSYBOX_IMAGE} AS pkg
COPY python/rm_abstract /rm-abstract/rm_abstract
COPY python/sitecustomize.py /rm-abstract/sitecustomize.py
# Sources only: the user's Python (3.9+, any libc) compiles them itself.
# (busybox find: no -delete.)
RUN find /rm-abstract \( -name '__pycache__' -type d -prune -o -name '*.py[co]' \) -exec rm -rf {} + \
 && chmod -R a+rX,go-w /rm-abstract

# busybox (static, ~1.5 MB) provides cp.
FROM ${BUSYBOX_IMAGE}
COPY --from=pkg /rm-abstract /rm-abstract
USER 65532:65532
ENTRYPOINT []
CMD ["cp", "-r", "/rm-abstract/.", "/rm-abstract-inject/"]
