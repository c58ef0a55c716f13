//! `sentinel-demo`: one command to a running Sentinel.
//!
//! The binary (`sentinel demo`, `src/main.rs`) starts Postgres (or uses
//! `DATABASE_URL`), the control plane, one proxy and the demo upstream in
//! one process, seeds a demo policy and prints how to use it. The library
//! holds what others reuse:
//! - [`upstream`]: the demo MCP server, also the benchmark's fast upstream.

pub mod upstream;
