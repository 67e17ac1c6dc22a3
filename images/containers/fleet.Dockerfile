# syntax=docker/dockerfile:1
# outpost-fleet: registry, rollouts, embedded MQTT broker, operator API.
#
#   docker buildx build -f images/containers/fleet.Dockerfile -t outpost-fleet .
#
# Built natively for the target platform (glibc), because the fleet links C
# code beyond tract's kernels (bundled SQLite, TLS crypto) that is simplest to
# build with the platform's own compiler; the fleet server usually runs on
# amd64 anyway. The final stage is distroless: glibc, CA certificates (for an
# external mqtts:// broker) and a nonroot user, but no shell.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The binary is copied out of the cached target dir in the same step. The
# state directory is made here because the final image has no shell.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eu; \
    cargo build --locked --release -p outpost-fleet --bin outpost-fleet; \
    install -D -m 0755 target/release/outpost-fleet /out/outpost-fleet; \
    install -d -m 0700 /out/data

# Same Debian release as the build stage, so the glibc matches.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/outpost-fleet /usr/local/bin/outpost-fleet
COPY --from=build --chown=65532:65532 /out/data /var/lib/outpost
USER 65532:65532
# HTTP API (/health, /ready, /metrics, operator API) and MQTT for devices;
# the actual ports are whatever fleet.toml's api_listen and [broker] listen say.
EXPOSE 8080 1883 8883
VOLUME ["/var/lib/outpost"]
ENTRYPOINT ["/usr/local/bin/outpost-fleet"]
CMD ["serve", "--config", "/etc/outpost/fleet.toml"]
