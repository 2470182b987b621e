# syntax=docker/dockerfile:1
# rekey-lambda, AWS Secrets Manager's rotation function, as a Lambda
# container image: the binary is the custom runtime's bootstrap
# (/var/runtime/bootstrap, as in provided.al2023) and the entrypoint, so
# it talks to the Lambda Runtime API itself. Distroless (glibc and
# libgcc, CA certificates for Secrets Manager's endpoint, no shell), as
# uid/gid 65532 like the other rekey images; Lambda runs it as a user of
# its own, so everything here is readable by any user. Build from the
# repository root:
#
#   docker build -f deploy/docker/lambda.Dockerfile -t rekey/rekey-lambda .
#
# Deploy with `aws lambda create-function --package-type Image --code
# ImageUri=...` and the REKEY_* variables as the function's environment
# (`rekey-lambda --check-config` checks them). Lambda gives the function a
# read-only root filesystem; rekey-lambda writes nothing. Locally it needs
# the Lambda Runtime Interface Emulator as its entrypoint. The zip package
# for the provided.al2023 runtime is built as the README shows.
# tests/deploy_images.rs runs the binary the way this image does.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Symbols stay (names in backtraces); the line tables of the release
# profile would more than double the image.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
COPY . .
# rustup installs the toolchain rust-toolchain.toml names when it differs
# from the image's. The caches keep the registry and the build between
# builds of every rekey image; the binary is copied out of the cache
# mount in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --locked --release -p rekey-backend --bin rekey-lambda \
    && install -D -m 0755 target/release/rekey-lambda /out/var/runtime/bootstrap \
    && install -d -m 0755 /out/var/task

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="rekey-lambda" \
      org.opencontainers.image.description="rekey: zero-downtime secret rotation; the AWS Secrets Manager rotation function (Lambda custom runtime bootstrap)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/rekey"
COPY --from=build /out/ /
WORKDIR /var/task
USER 65532:65532
ENTRYPOINT ["/var/runtime/bootstrap"]
