# syntax=docker/dockerfile:1
#
# sentinel-control-plane (and sentinelctl, for one-shot admin jobs).
# Build from the repository root:
#
#   docker build -f deploy/docker/control-plane.Dockerfile -t sentinel-control-plane .
#
# BuildKit (the default builder since Docker 23) reads
# control-plane.Dockerfile.dockerignore beside this file, which keeps
# target/ and .git out of the build context.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The whole workspace: cargo resolves every member's manifest even when
# building one package. protoc is vendored (crates/shared/build.rs) and the
# migrations are embedded at compile time.
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY migrations migrations
COPY crates crates
COPY tests tests
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sentinel-control-plane \
        --bin sentinel-control-plane --bin sentinelctl \
 && install -D -m 0755 -t /out \
        target/release/sentinel-control-plane target/release/sentinelctl

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 sentinel \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent \
        --no-create-home --shell /usr/sbin/nologin sentinel
COPY --from=build /out/ /usr/local/bin/
# Listen on every interface inside the container. Mount your own file over
# it; SENTINEL_CP_* variables and DATABASE_URL override any file. (The file
# is named with --config: SENTINEL_CP_CONFIG is currently refused as an
# unknown field by the SENTINEL_CP_* override reader.)
COPY deploy/docker/control-plane.container.toml /etc/sentinel/control-plane.toml
USER 10001:10001
# 50051: gRPC (policy sync, audit ingest, admin). 8080: REST, /healthz,
# /readyz, /metrics.
EXPOSE 50051 8080
ENTRYPOINT ["/usr/local/bin/sentinel-control-plane", "--config", "/etc/sentinel/control-plane.toml"]
CMD ["serve"]
