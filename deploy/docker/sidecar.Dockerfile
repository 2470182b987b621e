# syntax=docker/dockerfile:1
# rekey-sidecar on distroless (glibc and libgcc, CA certificates, no
# shell), as uid/gid 65532 (distroless's "nonroot"). Build from the
# repository root:
#
#   docker build -f deploy/docker/sidecar.Dockerfile -t rekey/rekey-sidecar .
#
# It runs with a read-only root filesystem and writes only the secret
# files it delivers, into /etc/app, a volume the app's container shares
# (in Kubernetes an emptyDir with medium: Memory). Its configuration comes
# from arguments (--backend, --token-file, --secret ID:PATH, or --config)
# and REKEY_* variables. tests/deploy_images.rs runs the binary the way
# this image does.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Symbols stay (names in backtraces); the line tables of the release
# profile would more than double the image.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
COPY . .
# rustup installs the toolchain rust-toolchain.toml names when it differs
# from the image's. The caches keep the registry and the build between
# builds of every rekey image; the binary is copied out of the cache
# mount in the same step, with the output directory it writes to.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --locked --release -p rekey-sidecar --bin rekey-sidecar \
    && install -D -m 0755 -t /out/usr/local/bin target/release/rekey-sidecar \
    && install -d -m 0755 -o 65532 -g 65532 /out/etc/app

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="rekey-sidecar" \
      org.opencontainers.image.description="rekey: zero-downtime secret rotation for Kubernetes; the per-pod agent that writes rotated secrets for the app (HTTP 2773: /livez, /readyz, /metrics, read API)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/rekey"
# COPY --from keeps the owners set above: the output directory is
# 65532's, so a fresh volume mounted there is too.
COPY --from=build /out/ /
WORKDIR /
# On every interface, so that kubelet's probes reach /readyz on the pod
# IP. The read API still needs its token and refuses proxied requests;
# admit no other pod to the port (a NetworkPolicy). REKEY_LISTEN takes
# precedence over listen in a config file; --listen over both.
ENV REKEY_LISTEN=0.0.0.0:2773 \
    REKEY_LOG_FORMAT=json
VOLUME ["/etc/app"]
USER 65532:65532
EXPOSE 2773
ENTRYPOINT ["/usr/local/bin/rekey-sidecar"]
