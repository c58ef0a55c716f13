# syntax=docker/dockerfile:1
#
# sentinel-proxy. Build from the repository root:
#
#   docker build -f deploy/docker/proxy.Dockerfile -t sentinel-proxy .
#
# BuildKit reads proxy.Dockerfile.dockerignore beside this file.
#
# /var/lib/sentinel holds the audit spool and the policy cache. It must be
# a persistent volume, one per proxy: a call is forwarded only after its
# audit record is durable there (docs/AUDIT.md).

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY migrations migrations
COPY crates crates
COPY tests tests
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sentinel-proxy --bin sentinel-proxy \
 && install -D -m 0755 -t /out target/release/sentinel-proxy

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 sentinel \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent \
        --no-create-home --shell /usr/sbin/nologin sentinel \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/sentinel
COPY --from=build /out/ /usr/local/bin/
# Listen address, spool and cache paths for a container. proxy_id, the
# control-plane URL and the join token come from SENTINEL_PROXY_*
# variables (they override any file), or mount your own file over it.
# (Named with --config: SENTINEL_PROXY_CONFIG is currently refused as an
# unknown field by the SENTINEL_PROXY_* override reader.)
COPY deploy/docker/proxy.container.toml /etc/sentinel/proxy.toml
VOLUME ["/var/lib/sentinel"]
USER 10001:10001
# MCP endpoint (/mcp), /healthz, /readyz, /metrics.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/sentinel-proxy", "--config", "/etc/sentinel/proxy.toml"]
