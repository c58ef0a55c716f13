//! The policy a proxy enforces: how it arrives ([`watch`]) and the local
//! file form used by tests and standalone proxies ([`file`](mod@file)).

pub mod file;
pub mod watch;

pub use watch::{PolicyPublisher, PolicyReader, PolicyRejected, Snapshot, policy_channel};
