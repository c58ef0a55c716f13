//! `sentinelctl policy`: apply, diff, export and show the policy.
//!
//! Declarative: the file given to `apply` is the whole policy, and whatever
//! it leaves out is removed. `diff` and `apply --dry-run` ask the server to
//! validate and compare without changing anything, so what they show is
//! exactly what `apply` would do. Exported files carry `<redacted>` in place
//! of secrets; applying them back keeps the stored secrets.

use std::path::{Path, PathBuf};

use clap::{Subcommand, ValueEnum};
use sentinel_shared::proto as pb;
use sentinel_shared::spec::{PolicySpec, RateScope};
use serde_json::json;

use super::conn::{self, status};
use super::render::{self, Table};
use super::{Ctx, Error, ExitCode, Result, fail};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FileFormat {
    Yaml,
    Toml,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Make the policy exactly what FILE says (YAML, TOML or JSON by
    /// extension; `-` reads YAML from stdin).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Validate and show the changes; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Override the format the extension implies.
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
    },
    /// Show what applying FILE would change, one line per change.
    Diff {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
        /// Exit 1 when there are changes (for drift checks).
        #[arg(long)]
        exit_code: bool,
    },
    /// Write the current policy (secrets redacted) as a file you can apply.
    Export {
        /// Write here instead of stdout.
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Default: from the file's extension, else YAML.
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
    },
    /// Show the current policy: version, roles, backends, issuers.
    Get,
}

pub async fn run(ctx: &Ctx, cmd: PolicyCmd) -> Result<ExitCode> {
    match cmd {
        PolicyCmd::Apply {
            file,
            dry_run,
            format,
        } => {
            let spec = read_file(&file, format)?;
            let r = apply(ctx, spec, dry_run).await?;
            if ctx.json() {
                render::json(&json!({
                    "applied": r.applied,
                    "dry_run": dry_run,
                    "version": r.version,
                    "changes": r.changes,
                }))?;
            } else {
                print_changes(&r.changes)?;
                let line = match (dry_run, r.changes.is_empty(), r.applied) {
                    (_, true, _) => format!("no changes (policy version {})", r.version),
                    (true, false, _) => format!(
                        "dry run: {} change(s) would be applied; nothing changed (policy version {})",
                        r.changes.len(),
                        r.version
                    ),
                    (false, false, true) => format!("applied: policy version {}", r.version),
                    (false, false, false) => format!("not applied (policy version {})", r.version),
                };
                render::note(&line);
            }
            Ok(0)
        }
        PolicyCmd::Diff {
            file,
            format,
            exit_code,
        } => {
            let spec = read_file(&file, format)?;
            let r = apply(ctx, spec, true).await?;
            if ctx.json() {
                render::json(&json!({"version": r.version, "changes": r.changes}))?;
            } else {
                print_changes(&r.changes)?;
                if r.changes.is_empty() {
                    render::note(&format!("no changes (policy version {})", r.version));
                }
            }
            Ok(if exit_code && !r.changes.is_empty() {
                1
            } else {
                0
            })
        }
        PolicyCmd::Export { file, format } => {
            let format = format
                .or_else(|| file.as_deref().and_then(format_of))
                .unwrap_or(FileFormat::Yaml);
            let (version, spec) = current(ctx).await?;
            let text = serialize(&spec, format, version)?;
            match file {
                Some(p) if p.as_os_str() != "-" => {
                    std::fs::write(&p, text).map_err(|e| {
                        Error::Message(format!("cannot write {}: {e}", p.display()))
                    })?;
                    render::note(&format!(
                        "exported policy version {version} to {}",
                        p.display()
                    ));
                }
                _ => render::out(&text)?,
            }
            Ok(0)
        }
        PolicyCmd::Get => {
            let (version, spec) = current(ctx).await?;
            if ctx.json() {
                render::json(&json!({"version": version, "spec": spec}))?;
            } else {
                show(version, &spec)?;
            }
            Ok(0)
        }
    }
}

/// The current policy, as the server shows it (secrets redacted).
pub async fn current(ctx: &Ctx) -> Result<(u64, PolicySpec)> {
    let mut admin = conn::admin(ctx).await?;
    let view = admin
        .get_policy(pb::GetPolicyRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let spec = PolicySpec::try_from(view.spec.unwrap_or_default()).map_err(|e| {
        Error::Message(format!(
            "the server sent a policy this CLI cannot read: {e}"
        ))
    })?;
    Ok((view.version, spec))
}

async fn apply(ctx: &Ctx, spec: PolicySpec, dry_run: bool) -> Result<pb::ApplyPolicyResponse> {
    let mut admin = conn::admin(ctx).await?;
    Ok(admin
        .apply_policy(pb::ApplyPolicyRequest {
            spec: Some((&spec).into()),
            dry_run,
        })
        .await
        .map_err(status)?
        .into_inner())
}

fn print_changes(changes: &[String]) -> Result<()> {
    let mut s = String::new();
    for c in changes {
        s.push_str(&render::clean(c));
        s.push('\n');
    }
    render::out(&s)
}

fn format_of(p: &Path) -> Option<FileFormat> {
    match p.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "yaml" | "yml" => Some(FileFormat::Yaml),
        "toml" => Some(FileFormat::Toml),
        "json" => Some(FileFormat::Json),
        _ => None,
    }
}

/// Reads and parses a policy file. Validation is the server's: it reports
/// every problem at once, each naming its field.
pub fn read_file(path: &Path, format: Option<FileFormat>) -> Result<PolicySpec> {
    let stdin = path.as_os_str() == "-";
    let format = match format.or_else(|| format_of(path)) {
        Some(f) => f,
        None if stdin => FileFormat::Yaml,
        None => {
            return fail(format!(
                "cannot tell the format of {}: name it .yaml, .yml, .toml or .json, or pass --format",
                path.display()
            ));
        }
    };
    let text = if stdin {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| Error::Message(format!("cannot read stdin: {e}")))?
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| Error::Message(format!("cannot read {}: {e}", path.display())))?
    };
    parse(&text, format).map_err(|m| Error::Message(format!("{}: {m}", path.display())))
}

pub fn parse(text: &str, format: FileFormat) -> Result<PolicySpec, String> {
    match format {
        // An empty YAML document is the empty policy, as `{}` would be.
        FileFormat::Yaml if text.trim().is_empty() => Ok(PolicySpec::default()),
        FileFormat::Yaml => serde_yaml_ng::from_str(text).map_err(|e| e.to_string()),
        FileFormat::Toml => {
            toml::from_str(text).map_err(|e| e.message().to_string() + &span(text, e.span()))
        }
        FileFormat::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
    }
}

/// ` at line L column C` for a TOML error's byte span.
fn span(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(r) = span else {
        return String::new();
    };
    let before = text.get(..r.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(" at line {line} column {col}")
}

pub fn serialize(spec: &PolicySpec, format: FileFormat, version: u64) -> Result<String> {
    let head = format!(
        "# Sentinel policy, version {version}. Secrets show as <redacted>;\n\
         # applying this file back keeps the stored ones.\n"
    );
    let body = match format {
        FileFormat::Yaml => serde_yaml_ng::to_string(spec).map_err(|e| e.to_string()),
        FileFormat::Toml => toml::to_string_pretty(spec).map_err(|e| e.to_string()),
        FileFormat::Json => {
            return serde_json::to_string_pretty(spec)
                .map(|s| s + "\n")
                .map_err(|e| Error::Message(format!("cannot render the policy: {e}")));
        }
    }
    .map_err(|e| Error::Message(format!("cannot render the policy: {e}")))?;
    Ok(head + &body)
}

fn show(version: u64, spec: &PolicySpec) -> Result<()> {
    let mut s = format!("policy version {version}\n\n");
    let mut roles = Table::new(&["ROLE", "ALLOW", "DENY", "RATE LIMITS"]);
    for r in &spec.roles {
        let limits: Vec<String> = r
            .rate_limits
            .iter()
            .map(|l| {
                let scope = match l.scope {
                    RateScope::PerKey => "per key",
                    RateScope::PerRole => "per role",
                };
                format!("{}/s burst {} {scope}", l.per_second, l.burst)
            })
            .collect();
        roles.row(vec![
            r.name.clone(),
            r.allow.join(","),
            r.deny.join(","),
            limits.join("; "),
        ]);
    }
    s.push_str(&roles.render());
    s.push('\n');
    let mut backends = Table::new(&["BACKEND", "TRANSPORT", "TARGET", "TIMEOUT", "STATE"]);
    for b in &spec.backends {
        let (transport, target) = match (&b.url, &b.stdio) {
            (Some(u), _) => ("http", u.clone()),
            (None, Some(c)) => ("stdio", c.clone()),
            (None, None) => ("-", String::new()),
        };
        backends.row(vec![
            b.name.clone(),
            transport.into(),
            target,
            if b.timeout_ms == 0 {
                "default".into()
            } else {
                format!("{}ms", b.timeout_ms)
            },
            if b.disabled { "disabled" } else { "enabled" }.into(),
        ]);
    }
    s.push_str(&backends.render());
    if !spec.jwt_issuers.is_empty() {
        s.push('\n');
        let mut issuers = Table::new(&[
            "JWT ISSUER",
            "ISSUER",
            "AUDIENCES",
            "ALGORITHMS",
            "DEFAULT ROLE",
        ]);
        for j in &spec.jwt_issuers {
            issuers.row(vec![
                j.name.clone(),
                j.issuer.clone(),
                j.audiences.join(","),
                j.algorithms.join(","),
                j.default_role.clone(),
            ]);
        }
        s.push_str(&issuers.render());
    }
    render::out(&s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DOC: &str = "roles:\n  - name: ops\n    allow: [\"everything/*\"]\n    deny: [\"everything/trigger-*\"]\n    rate_limits:\n      - per_second: 5.0\n        burst: 10\nbackends:\n  - name: everything\n    url: http://127.0.0.1:3001/mcp\n    headers:\n      Authorization: <redacted>\n";

    #[test]
    fn every_format_round_trips() {
        let spec = parse(DOC, FileFormat::Yaml).unwrap();
        assert_eq!(spec.roles[0].allow, vec!["everything/*"]);
        for f in [FileFormat::Yaml, FileFormat::Toml, FileFormat::Json] {
            let text = serialize(&spec, f, 3).unwrap();
            assert_eq!(parse(&text, f).unwrap(), spec, "{f:?}:\n{text}");
        }
    }

    #[test]
    fn parse_errors_say_where() {
        let e = parse("roles:\n  - name: ops\n    alow: []\n", FileFormat::Yaml).unwrap_err();
        assert!(e.contains("alow"), "{e}");
        let e = parse("[[roles]]\nname = 'ops'\nalow = []\n", FileFormat::Toml).unwrap_err();
        assert!(e.contains("alow") && e.contains("line 3"), "{e}");
        assert_eq!(parse("", FileFormat::Yaml).unwrap(), PolicySpec::default());
    }
}
