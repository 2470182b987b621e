# syntax=docker/dockerfile:1
# rekey-backend, with the rekey CLI beside it, on distroless (glibc and
# libgcc, CA certificates, no shell), as uid/gid 65532 (distroless's
# "nonroot"). Build from the repository root:
#
#   docker build -f deploy/docker/backend.Dockerfile -t rekey/rekey-backend .
#
# It runs with a read-only root filesystem: the only place it writes is
# its data directory, a volume. Unless configured otherwise, that holds
# the embedded SQLite store, a development KEK and the admin token, and
# `docker exec CONTAINER rekey status` needs no flags (the CLI, run in the
# working directory, reads ./rekey-data/admin.token). In production give
# it a store (REKEY_STORE_URL or a config file) and mount the KEK and the
# admin token as secrets (REKEY_KEK_FILE, REKEY_AUTH_ADMIN_TOKEN_FILE).
# tests/deploy_images.rs runs the binaries the way this image does.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Symbols stay (names in backtraces); the line tables of the release
# profile would more than double the image.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
COPY . .
# rustup installs the toolchain rust-toolchain.toml names when it differs
# from the image's. The caches keep the registry and the build between
# builds of every rekey image; the binaries are copied out of the cache
# mount in the same step, with the data directory they write to.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --locked --release \
        -p rekey-backend --bin rekey-backend \
        -p rekey-cli --bin rekey \
    && install -D -m 0755 -t /out/usr/local/bin \
        target/release/rekey-backend target/release/rekey \
    && install -d -m 0755 /out/var/lib/rekey \
    && install -d -m 0700 -o 65532 -g 65532 /out/var/lib/rekey/rekey-data

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="rekey-backend" \
      org.opencontainers.image.description="rekey: zero-downtime secret rotation for Kubernetes; the backend (gRPC 7700, metrics 7701) and the rekey CLI" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/rekey"
# COPY --from keeps the owners set above: the data directory is 65532's,
# so a fresh volume mounted there is too.
COPY --from=build /out/ /
# The backend's default data directory, ./rekey-data, is the volume below
# (a config file's data_dir still chooses another).
WORKDIR /var/lib/rekey
# Listen on every interface of the container. These variables take
# precedence over listen and metrics_listen in a config file: set them
# (in the pod spec) to change the addresses. Keep the metrics port private
# (a NetworkPolicy) or set REKEY_METRICS_BEARER_TOKEN_FILE: /metrics names
# secret ids.
ENV REKEY_LISTEN=0.0.0.0:7700 \
    REKEY_METRICS_LISTEN=0.0.0.0:7701 \
    REKEY_LOG_FORMAT=json
VOLUME ["/var/lib/rekey/rekey-data"]
USER 65532:65532
EXPOSE 7700 7701
ENTRYPOINT ["/usr/local/bin/rekey-backend"]
