//! The `sentinel-control-plane` binary's start-up failures: a clear message
//! and a distinct exit code, never a panic.

#![allow(clippy::unwrap_used)] // a test fails loudly on any surprise

use std::process::Command;

fn cp() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sentinel-control-plane"));
    c.env_remove("DATABASE_URL")
        .env(
            "SENTINEL_CP_ADMIN_TOKENS",
            "[\"admin-token-0123456789abcdef\"]",
        )
        .env("SENTINEL_CP_GRPC__LISTEN", "127.0.0.1:0")
        .env("SENTINEL_CP_HTTP__LISTEN", "127.0.0.1:0");
    c
}

#[test]
fn bad_configuration_names_the_field_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cp.toml");
    std::fs::write(
        &file,
        "database_url = \"postgres://x@127.0.0.1:1/db\"\n[sync]\nreload_interval_secs = \"soon\"\n",
    )
    .unwrap();
    let out = cp().arg("--config").arg(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("sync.reload_interval_secs"), "{stderr}");

    let out = cp().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("database_url"), "{stderr}");
}

#[test]
fn unreachable_database_is_reported_and_exits_69() {
    let out = cp()
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/sentinel")
        .env("SENTINEL_CP_DB__CONNECT_TIMEOUT_SECS", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("cannot reach Postgres at 127.0.0.1:1/sentinel"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn the_config_file_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cp.toml");
    std::fs::write(&file, "[sync]\nreload_interval_secs = \"soon\"\n").unwrap();
    let out = cp().env("SENTINEL_CP_CONFIG", &file).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The file was read (its error is reported), and `config` is not
    // mistaken for a setting.
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("sync.reload_interval_secs"), "{stderr}");
    assert!(!stderr.contains("unknown field"), "{stderr}");
}
