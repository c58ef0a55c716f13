//! Whole-system tests: a control plane on real Postgres, proxies joined to
//! it over gRPC, real MCP upstreams and clients (the official Python and
//! TypeScript SDKs), all on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly

mod end_to_end;
mod faults;
mod fleet;
mod passthrough;
mod policy_file;
mod stdio;
mod tls;
