//! Sentinel's control plane: the one owner of Postgres.
//!
//! Modules:
//! - [`cli`]: `sentinelctl`, the operators' CLI over the admin APIs;
//! - [`config`]: the configuration file and environment overrides;
//! - [`db`]: the pool and the embedded migrations;
//! - [`store`]: every SQL statement (policy, keys, audit, fleet);
//! - [`error`]: the error type and its gRPC/HTTP mappings;
//! - [`policy_bus`]: the current snapshot, fanned out to sync streams;
//! - [`grpc`]: policy sync, audit ingest, admin services;
//! - [`server`]: start-up, listeners, retention;
//! - [`state`]: what the admin surfaces share, the admin credential check;
//! - [`local_pg`]: a throwaway Postgres from the local binaries;
//! - [`testing`]: a fresh database per test.

pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod grpc;
pub mod local_pg;
pub mod policy_bus;
pub mod rest;
pub mod server;
pub mod state;
pub mod store;
pub mod testing;
