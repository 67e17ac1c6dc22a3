# syntax=docker/dockerfile:1
# outpost-runtime as a standalone model server (Kubernetes: images/k8s/).
#
#   docker buildx build -f images/containers/runtime.Dockerfile \
#     --platform linux/amd64,linux/arm64,linux/arm/v7 -t outpost-runtime .
#
# The build stage runs on the build machine's own architecture and
# cross-compiles (the same static targets and .cargo/config.toml as
# scripts/build-arm.sh), so a multi-arch image needs no emulated compiler.
# The binary is fully static, hence the empty final stage: nothing in the
# image but the server, no shell, no package manager.

ARG RUST_VERSION=1.95

FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-bookworm AS build
ARG TARGETARCH
ARG TARGETVARIANT
# Per target platform: the Rust target, and the cross C compiler tract-linalg
# assembles its kernels with (the armv7 one also links glibc statically).
RUN set -eu; \
    case "${TARGETARCH}${TARGETVARIANT}" in \
      amd64)  echo x86_64-unknown-linux-musl > /rust-target; pkgs=musl-tools ;; \
      arm64|arm64v8) echo aarch64-unknown-linux-musl > /rust-target; pkgs=gcc-aarch64-linux-gnu ;; \
      armv7)  echo armv7-unknown-linux-gnueabihf > /rust-target; pkgs=gcc-arm-linux-gnueabihf ;; \
      *) echo "unsupported platform ${TARGETARCH}${TARGETVARIANT}" >&2; exit 1 ;; \
    esac; \
    apt-get update -qq; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    rustup target add "$(cat /rust-target)"
WORKDIR /src
COPY . .
# Caches keep the registry and compiled dependencies between image builds;
# the binary is copied out of the cached target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=outpost-target-${TARGETARCH}${TARGETVARIANT} \
    set -eu; t="$(cat /rust-target)"; \
    cargo build --locked --profile device --target "$t" -p outpost-runtime --bin outpost-runtime; \
    install -D -m 0755 "target/$t/device/outpost-runtime" /out/outpost-runtime

FROM scratch
COPY --from=build /out/outpost-runtime /outpost-runtime
# Any unprivileged id works (no /etc/passwd needed); 65532 is the
# conventional "nonroot" of distroless images.
USER 65532:65532
EXPOSE 8080
# No HEALTHCHECK: there is no shell or curl in the image. Orchestrators probe
# GET /health (liveness) and GET /ready (readiness) directly.
ENTRYPOINT ["/outpost-runtime"]
# Mount or bake the model at /models (see README.md). A signed bundle is
# served with: serve --model /models/model.outpost --trust /etc/outpost/root.pub
CMD ["serve", "--model", "/models/model.onnx", "--listen", "0.0.0.0:8080"]
