//! The declarative policy as people write it (YAML, TOML, JSON over REST),
//! its validation, and its conversion to and from the protobuf contract.
//!
//! This is the one place that decides whether a policy is acceptable. The
//! control plane validates every write with it; the proxy compiles only what
//! passed it. Errors name the field with a path such as
//! `roles[1].allow[0]`, so an operator can find the line at fault.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::proto;

/// Stands in for a secret value in every admin read. Writing it back (for
/// example re-applying an exported policy) keeps the stored secret.
pub const REDACTED: &str = "<redacted>";

/// The policy, minus API keys and session keys (which are runtime state, not
/// something written in a file).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySpec {
    pub roles: Vec<RoleSpec>,
    pub backends: Vec<BackendSpec>,
    pub jwt_issuers: Vec<JwtIssuerSpec>,
    pub redaction_rules: Vec<RedactionRuleSpec>,
    pub audit: AuditSpec,
    pub federation: FederationSpec,
}

/// What the holders of a role may call and how fast.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoleSpec {
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Tool patterns this role may call: `backend/tool` or just `tool`
    /// (any backend), with globs.
    pub allow: Vec<String>,
    /// Tool patterns this role may never call; deny wins over allow.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitSpec>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateScope {
    /// One bucket per API key or JWT subject.
    #[default]
    PerKey,
    /// One bucket shared by everyone holding the role (per proxy).
    PerRole,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSpec {
    pub scope: RateScope,
    /// Sustained rate, tokens per second.
    pub per_second: f64,
    /// Bucket size: how many calls may arrive at once.
    pub burst: u32,
    /// Only calls to these tool patterns count; empty: all tools.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// Methods that count; empty: only `tools/call`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// An upstream MCP server: over Streamable HTTP (`url`) or a stdio command
/// declared in the proxy's own config (`stdio`, by name).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendSpec {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Static headers sent upstream, e.g. the upstream's own credential.
    /// Values are secret.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdio: Option<String>,
    /// Per-request timeout, milliseconds; 0 means the proxy's default.
    #[serde(skip_serializing_if = "is_zero")]
    pub timeout_ms: u32,
    #[serde(skip_serializing_if = "is_false")]
    pub disabled: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtIssuerSpec {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub public_keys_pem: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub jwks_url: String,
    /// Shared secret for HS* algorithms. Secret.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hmac_secret: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subject_claim: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub role_claim: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub default_role: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub leeway_seconds: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedactionRuleSpec {
    /// Case-insensitive glob over argument key names, at any depth.
    pub key_pattern: String,
    pub replacement: String,
}

impl Default for RedactionRuleSpec {
    fn default() -> Self {
        Self {
            key_pattern: String::new(),
            replacement: "[REDACTED]".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSpec {
    /// Bound on the audited arguments, bytes; 0 records no arguments.
    pub max_argument_bytes: u32,
    /// Bound on the audited response summary, bytes.
    pub max_response_bytes: u32,
    /// Methods audited besides `tools/call`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_methods: Vec<String>,
    /// Days of audit the control plane keeps; 0 keeps everything.
    pub retention_days: u32,
}

pub const DEFAULT_MAX_ARGUMENT_BYTES: u32 = 8 * 1024;
pub const DEFAULT_MAX_RESPONSE_BYTES: u32 = 1024;

impl Default for AuditSpec {
    fn default() -> Self {
        Self {
            max_argument_bytes: DEFAULT_MAX_ARGUMENT_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            extra_methods: Vec::new(),
            retention_days: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefixMode {
    /// Every name is shown as `<backend><separator><name>`: names never
    /// change when a backend is added.
    #[default]
    Always,
    /// Names are prefixed only where two backends offer the same one.
    OnCollision,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationSpec {
    pub prefix_mode: PrefixMode,
    pub separator: String,
}

pub const DEFAULT_SEPARATOR: &str = "__";

impl Default for FederationSpec {
    fn default() -> Self {
        Self {
            prefix_mode: PrefixMode::Always,
            separator: DEFAULT_SEPARATOR.into(),
        }
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Every problem found in a document, reported at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl std::fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", e.field, e.message)?;
        }
        Ok(())
    }
}

impl ValidationErrors {
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    pub fn single(field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::default();
        e.push(field, message);
        e
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }

    /// Prefixes every field path, for errors found in a nested document.
    pub fn nest(mut self, prefix: &str) -> Self {
        for e in &mut self.0 {
            e.field = if e.field.is_empty() {
                prefix.to_string()
            } else {
                format!("{prefix}.{}", e.field)
            };
        }
        self
    }
}

/// Algorithms a JWT issuer may list. `none` is never among them.
pub const HMAC_ALGORITHMS: &[&str] = &["HS256", "HS384", "HS512"];
pub const ASYMMETRIC_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// Headers a backend may not set: they belong to the transport or the MCP
/// session, and overriding them would break or hijack the upstream exchange.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "accept",
    "connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "mcp-session-id",
    "mcp-protocol-version",
    "mcp-method",
    "mcp-name",
    "last-event-id",
];

pub fn valid_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// Validates a tool pattern. Patterns with a `/` match `backend/tool`;
/// patterns without one match the tool name on any backend.
pub fn validate_tool_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("must not be empty".into());
    }
    if pattern.len() > 256 {
        return Err("must be at most 256 characters".into());
    }
    if pattern.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain whitespace or control characters".into());
    }
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|_| ())
        .map_err(|e| format!("invalid glob: {}", e.kind()))
}

/// Checks a URL for an HTTP(S) upstream or a JWKS endpoint.
pub fn validate_http_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a valid URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("must be an http:// or https:// URL".into()),
    }
    match uri.authority() {
        None => return Err("must name a host".into()),
        // Credentials in a URL end up in logs and are not sent by the
        // proxy: an upstream's credential belongs in the backend's headers.
        Some(a) if a.as_str().contains('@') => {
            return Err(
                "must not carry credentials (user:password@); set them in 'headers'".into(),
            );
        }
        Some(_) => {}
    }
    Ok(())
}

impl PolicySpec {
    /// Validates the whole document, returning every problem found.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        let mut role_names = HashSet::new();
        for (i, role) in self.roles.iter().enumerate() {
            role.validate_into(&format!("roles[{i}]"), &mut errs);
            if !role_names.insert(role.name.as_str()) {
                errs.push(
                    format!("roles[{i}].name"),
                    format!("duplicate role '{}'", role.name),
                );
            }
        }
        let mut backend_names = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            b.validate_into(
                &format!("backends[{i}]"),
                &self.federation.separator,
                &mut errs,
            );
            if !backend_names.insert(b.name.as_str()) {
                errs.push(
                    format!("backends[{i}].name"),
                    format!("duplicate backend '{}'", b.name),
                );
            }
        }
        let mut issuer_names = HashSet::new();
        for (i, j) in self.jwt_issuers.iter().enumerate() {
            let path = format!("jwt_issuers[{i}]");
            j.validate_into(&path, &mut errs);
            if !issuer_names.insert(j.name.as_str()) {
                errs.push(
                    format!("{path}.name"),
                    format!("duplicate issuer '{}'", j.name),
                );
            }
            if !j.default_role.is_empty() && !role_names.contains(j.default_role.as_str()) {
                errs.push(
                    format!("{path}.default_role"),
                    format!("no role named '{}'", j.default_role),
                );
            }
        }
        for (i, r) in self.redaction_rules.iter().enumerate() {
            let path = format!("redaction_rules[{i}]");
            if let Err(m) = validate_glob_ci(&r.key_pattern) {
                errs.push(format!("{path}.key_pattern"), m);
            }
            if r.replacement.len() > 256 {
                errs.push(
                    format!("{path}.replacement"),
                    "must be at most 256 characters",
                );
            }
        }
        self.audit.validate_into("audit", &mut errs);
        self.federation.validate_into("federation", &mut errs);
        errs.into_result()
    }

    /// A copy with every secret replaced by [`REDACTED`], for admin reads.
    pub fn redacted(&self) -> PolicySpec {
        let mut out = self.clone();
        for b in &mut out.backends {
            for v in b.headers.values_mut() {
                *v = REDACTED.to_string();
            }
        }
        for j in &mut out.jwt_issuers {
            if !j.hmac_secret.is_empty() {
                j.hmac_secret = REDACTED.to_string();
            }
        }
        out
    }

    /// Replaces every [`REDACTED`] placeholder with the secret stored for the
    /// same backend header or issuer in `stored`. A placeholder with nothing
    /// to keep is an error naming the field.
    pub fn restore_secrets(&mut self, stored: &PolicySpec) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        for (i, b) in self.backends.iter_mut().enumerate() {
            let old = stored.backends.iter().find(|o| o.name == b.name);
            for (name, value) in b.headers.iter_mut() {
                if value == REDACTED {
                    match old.and_then(|o| o.headers.get(name)) {
                        Some(kept) => *value = kept.clone(),
                        None => errs.push(
                            format!("backends[{i}].headers.{name}"),
                            "is the redaction placeholder but no stored secret exists to keep",
                        ),
                    }
                }
            }
        }
        for (i, j) in self.jwt_issuers.iter_mut().enumerate() {
            if j.hmac_secret == REDACTED {
                match stored.jwt_issuers.iter().find(|o| o.name == j.name) {
                    Some(o) if !o.hmac_secret.is_empty() => j.hmac_secret = o.hmac_secret.clone(),
                    _ => errs.push(
                        format!("jwt_issuers[{i}].hmac_secret"),
                        "is the redaction placeholder but no stored secret exists to keep",
                    ),
                }
            }
        }
        errs.into_result()
    }

    /// Human-readable differences from `old` to `self`, one line each:
    /// `+ role ops`, `- backend legacy`, `~ audit`.
    pub fn diff_lines(&self, old: &PolicySpec) -> Vec<String> {
        let mut out = Vec::new();
        diff_named(&mut out, "role", &old.roles, &self.roles, |r| &r.name);
        diff_named(&mut out, "backend", &old.backends, &self.backends, |b| {
            &b.name
        });
        diff_named(
            &mut out,
            "jwt_issuer",
            &old.jwt_issuers,
            &self.jwt_issuers,
            |j| &j.name,
        );
        if old.redaction_rules != self.redaction_rules {
            out.push("~ redaction_rules".into());
        }
        if old.audit != self.audit {
            out.push("~ audit".into());
        }
        if old.federation != self.federation {
            out.push("~ federation".into());
        }
        out
    }
}

fn diff_named<T: PartialEq>(
    out: &mut Vec<String>,
    kind: &str,
    old: &[T],
    new: &[T],
    name: impl Fn(&T) -> &String,
) {
    for n in new {
        match old.iter().find(|o| name(o) == name(n)) {
            None => out.push(format!("+ {kind} {}", name(n))),
            Some(o) if o != n => out.push(format!("~ {kind} {}", name(n))),
            Some(_) => {}
        }
    }
    for o in old {
        if !new.iter().any(|n| name(n) == name(o)) {
            out.push(format!("- {kind} {}", name(o)));
        }
    }
}

fn validate_glob_ci(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("must not be empty".into());
    }
    if pattern.len() > 256 {
        return Err("must be at most 256 characters".into());
    }
    globset::GlobBuilder::new(pattern)
        .case_insensitive(true)
        .build()
        .map(|_| ())
        .map_err(|e| format!("invalid glob: {}", e.kind()))
}

impl RoleSpec {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        self.validate_into("", &mut errs);
        errs.into_result()
    }

    fn validate_into(&self, path: &str, errs: &mut ValidationErrors) {
        let p = |f: &str| join(path, f);
        if !valid_name(&self.name, 64) {
            errs.push(p("name"), "must be 1-64 characters of letters, digits, '_', '-', '.', starting with a letter or digit");
        }
        if self.description.len() > 1024 {
            errs.push(p("description"), "must be at most 1024 characters");
        }
        for (i, pat) in self.allow.iter().enumerate() {
            if let Err(m) = validate_tool_pattern(pat) {
                errs.push(p(&format!("allow[{i}]")), m);
            }
        }
        for (i, pat) in self.deny.iter().enumerate() {
            if let Err(m) = validate_tool_pattern(pat) {
                errs.push(p(&format!("deny[{i}]")), m);
            }
        }
        for (i, rl) in self.rate_limits.iter().enumerate() {
            let rp = p(&format!("rate_limits[{i}]"));
            if !(rl.per_second.is_finite() && rl.per_second > 0.0 && rl.per_second <= 1_000_000.0) {
                errs.push(
                    join(&rp, "per_second"),
                    "must be a number above 0 and at most 1000000",
                );
            }
            if rl.burst == 0 || rl.burst > 1_000_000 {
                errs.push(join(&rp, "burst"), "must be between 1 and 1000000");
            }
            for (k, pat) in rl.tools.iter().enumerate() {
                if let Err(m) = validate_tool_pattern(pat) {
                    errs.push(join(&rp, &format!("tools[{k}]")), m);
                }
            }
            for (k, m) in rl.methods.iter().enumerate() {
                if !valid_method(m) {
                    errs.push(
                        join(&rp, &format!("methods[{k}]")),
                        "must be an MCP method name such as 'tools/call'",
                    );
                }
            }
        }
    }
}

fn valid_method(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 128
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.'))
}

impl BackendSpec {
    pub fn validate(&self, separator: &str) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        self.validate_into("", separator, &mut errs);
        errs.into_result()
    }

    fn validate_into(&self, path: &str, separator: &str, errs: &mut ValidationErrors) {
        let p = |f: &str| join(path, f);
        if !valid_name(&self.name, 32) || self.name.contains('.') {
            errs.push(p("name"), "must be 1-32 characters of letters, digits, '_', '-', starting with a letter or digit");
        } else if !separator.is_empty() && self.name.contains(separator) {
            errs.push(
                p("name"),
                format!("must not contain the federation separator '{separator}'"),
            );
        }
        match (&self.url, &self.stdio) {
            (Some(url), None) => {
                if let Err(m) = validate_http_url(url) {
                    errs.push(p("url"), m);
                }
            }
            (None, Some(cmd)) => {
                if !valid_name(cmd, 64) {
                    errs.push(p("stdio"), "must name a command declared in the proxy's config (letters, digits, '_', '-', '.')");
                }
                if !self.headers.is_empty() {
                    errs.push(p("headers"), "only HTTP backends take headers");
                }
            }
            (Some(_), Some(_)) => errs.push(p("url"), "set either 'url' or 'stdio', not both"),
            (None, None) => errs.push(p("url"), "one of 'url' or 'stdio' is required"),
        }
        for (name, value) in &self.headers {
            let hp = p(&format!("headers.{name}"));
            match http::HeaderName::from_bytes(name.as_bytes()) {
                Err(_) => errs.push(hp.clone(), "is not a valid header name"),
                Ok(h) if RESERVED_HEADERS.contains(&h.as_str()) => errs.push(
                    hp.clone(),
                    "is set by the proxy itself and cannot be configured",
                ),
                Ok(_) => {}
            }
            if value != REDACTED && http::HeaderValue::from_str(value).is_err() {
                errs.push(hp, "value must be visible ASCII");
            }
        }
        if self.timeout_ms > 600_000 {
            errs.push(p("timeout_ms"), "must be at most 600000 (10 minutes)");
        }
    }
}

impl JwtIssuerSpec {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        self.validate_into("", &mut errs);
        errs.into_result()
    }

    fn validate_into(&self, path: &str, errs: &mut ValidationErrors) {
        let p = |f: &str| join(path, f);
        if !valid_name(&self.name, 64) {
            errs.push(
                p("name"),
                "must be 1-64 characters of letters, digits, '_', '-', '.'",
            );
        }
        if self.issuer.is_empty() {
            errs.push(p("issuer"), "is required (the expected 'iss' claim)");
        }
        if self.audiences.is_empty() || self.audiences.iter().any(String::is_empty) {
            errs.push(
                p("audiences"),
                "at least one non-empty audience is required (the expected 'aud' claim)",
            );
        }
        if self.algorithms.is_empty() {
            errs.push(p("algorithms"), "at least one algorithm is required");
        }
        let mut hmac = false;
        let mut asym = false;
        for (i, a) in self.algorithms.iter().enumerate() {
            if HMAC_ALGORITHMS.contains(&a.as_str()) {
                hmac = true;
            } else if ASYMMETRIC_ALGORITHMS.contains(&a.as_str()) {
                asym = true;
            } else {
                errs.push(
                    p(&format!("algorithms[{i}]")),
                    format!("'{a}' is not supported; use one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"),
                );
            }
        }
        if hmac && asym {
            errs.push(p("algorithms"), "must not mix HMAC (HS*) and public-key algorithms: that invites algorithm confusion");
        }
        if hmac {
            if self.hmac_secret != REDACTED && self.hmac_secret.len() < 32 {
                errs.push(
                    p("hmac_secret"),
                    "HS* algorithms need a secret of at least 32 bytes",
                );
            }
            if !self.public_keys_pem.is_empty() || !self.jwks_url.is_empty() {
                errs.push(p("public_keys_pem"), "HS* issuers take 'hmac_secret' only");
            }
        }
        if asym {
            if !self.hmac_secret.is_empty() {
                errs.push(
                    p("hmac_secret"),
                    "public-key algorithms take 'public_keys_pem' or 'jwks_url', not a secret",
                );
            }
            match (self.public_keys_pem.is_empty(), self.jwks_url.is_empty()) {
                (true, true) => errs.push(
                    p("public_keys_pem"),
                    "one of 'public_keys_pem' or 'jwks_url' is required",
                ),
                (false, false) => errs.push(
                    p("jwks_url"),
                    "set either 'public_keys_pem' or 'jwks_url', not both",
                ),
                (false, true) => {
                    for (i, pem) in self.public_keys_pem.iter().enumerate() {
                        if !(pem.contains("-----BEGIN ") && pem.contains("-----END ")) {
                            errs.push(p(&format!("public_keys_pem[{i}]")), "is not a PEM document");
                        }
                    }
                }
                (true, false) => {
                    if let Err(m) = validate_http_url(&self.jwks_url) {
                        errs.push(p("jwks_url"), m);
                    }
                }
            }
        }
        for (field, v) in [
            ("subject_claim", &self.subject_claim),
            ("role_claim", &self.role_claim),
        ] {
            if v.len() > 128 {
                errs.push(p(field), "must be at most 128 characters");
            }
        }
        if self.leeway_seconds > 300 {
            errs.push(p("leeway_seconds"), "must be at most 300");
        }
    }
}

impl AuditSpec {
    fn validate_into(&self, path: &str, errs: &mut ValidationErrors) {
        if self.max_argument_bytes > 1024 * 1024 {
            errs.push(join(path, "max_argument_bytes"), "must be at most 1048576");
        }
        if self.max_response_bytes > 1024 * 1024 {
            errs.push(join(path, "max_response_bytes"), "must be at most 1048576");
        }
        for (i, m) in self.extra_methods.iter().enumerate() {
            if !valid_method(m) {
                errs.push(
                    join(path, &format!("extra_methods[{i}]")),
                    "must be an MCP method name such as 'tools/list'",
                );
            }
        }
        if self.retention_days > 36500 {
            errs.push(join(path, "retention_days"), "must be at most 36500");
        }
    }
}

impl FederationSpec {
    fn validate_into(&self, path: &str, errs: &mut ValidationErrors) {
        let ok = !self.separator.is_empty()
            && self.separator.len() <= 4
            && self
                .separator
                .bytes()
                .all(|b| matches!(b, b'_' | b'-' | b'.'));
        if !ok {
            errs.push(
                join(path, "separator"),
                "must be 1-4 characters from '_', '-', '.'",
            );
        }
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

// ---------------------------------------------------------------------------
// Conversion to and from the protobuf contract. Every field is destructured,
// so adding one to either side fails the build until it is handled here.
// ---------------------------------------------------------------------------

impl From<&RoleSpec> for proto::Role {
    fn from(r: &RoleSpec) -> Self {
        let RoleSpec {
            name,
            description,
            allow,
            deny,
            rate_limits,
        } = r;
        proto::Role {
            name: name.clone(),
            description: description.clone(),
            allow_tools: allow.clone(),
            deny_tools: deny.clone(),
            rate_limits: rate_limits.iter().map(Into::into).collect(),
        }
    }
}

impl From<&RateLimitSpec> for proto::RateLimit {
    fn from(r: &RateLimitSpec) -> Self {
        let RateLimitSpec {
            scope,
            per_second,
            burst,
            tools,
            methods,
        } = r;
        proto::RateLimit {
            scope: match scope {
                RateScope::PerKey => proto::rate_limit::Scope::PerKey as i32,
                RateScope::PerRole => proto::rate_limit::Scope::PerRole as i32,
            },
            per_second: *per_second,
            burst: *burst,
            tools: tools.clone(),
            methods: methods.clone(),
        }
    }
}

impl TryFrom<proto::Role> for RoleSpec {
    type Error = ValidationErrors;
    fn try_from(r: proto::Role) -> Result<Self, Self::Error> {
        let proto::Role {
            name,
            description,
            allow_tools,
            deny_tools,
            rate_limits,
        } = r;
        let mut errs = ValidationErrors::default();
        let mut limits = Vec::with_capacity(rate_limits.len());
        for (i, rl) in rate_limits.into_iter().enumerate() {
            let proto::RateLimit {
                scope,
                per_second,
                burst,
                tools,
                methods,
            } = rl;
            let scope = match proto::rate_limit::Scope::try_from(scope) {
                Ok(proto::rate_limit::Scope::PerKey)
                | Ok(proto::rate_limit::Scope::Unspecified) => RateScope::PerKey,
                Ok(proto::rate_limit::Scope::PerRole) => RateScope::PerRole,
                Err(_) => {
                    errs.push(format!("rate_limits[{i}].scope"), "unknown scope");
                    RateScope::PerKey
                }
            };
            limits.push(RateLimitSpec {
                scope,
                per_second,
                burst,
                tools,
                methods,
            });
        }
        errs.into_result()?;
        Ok(RoleSpec {
            name,
            description,
            allow: allow_tools,
            deny: deny_tools,
            rate_limits: limits,
        })
    }
}

impl From<&BackendSpec> for proto::Backend {
    fn from(b: &BackendSpec) -> Self {
        let BackendSpec {
            name,
            url,
            headers,
            stdio,
            timeout_ms,
            disabled,
        } = b;
        let transport = match (url, stdio) {
            (Some(url), _) => Some(proto::backend::Transport::Http(proto::HttpBackend {
                url: url.clone(),
                headers: headers
                    .iter()
                    .map(|(k, v)| proto::Header {
                        name: k.clone(),
                        value: v.clone(),
                    })
                    .collect(),
            })),
            (None, Some(cmd)) => Some(proto::backend::Transport::Stdio(proto::StdioBackend {
                command_ref: cmd.clone(),
            })),
            (None, None) => None,
        };
        proto::Backend {
            name: name.clone(),
            transport,
            timeout_ms: *timeout_ms,
            disabled: *disabled,
        }
    }
}

impl From<proto::Backend> for BackendSpec {
    fn from(b: proto::Backend) -> Self {
        let proto::Backend {
            name,
            transport,
            timeout_ms,
            disabled,
        } = b;
        let (url, headers, stdio) = match transport {
            Some(proto::backend::Transport::Http(proto::HttpBackend { url, headers })) => (
                Some(url),
                headers.into_iter().map(|h| (h.name, h.value)).collect(),
                None,
            ),
            Some(proto::backend::Transport::Stdio(proto::StdioBackend { command_ref })) => {
                (None, BTreeMap::new(), Some(command_ref))
            }
            None => (None, BTreeMap::new(), None),
        };
        BackendSpec {
            name,
            url,
            headers,
            stdio,
            timeout_ms,
            disabled,
        }
    }
}

impl From<&JwtIssuerSpec> for proto::JwtIssuer {
    fn from(j: &JwtIssuerSpec) -> Self {
        let JwtIssuerSpec {
            name,
            issuer,
            audiences,
            algorithms,
            public_keys_pem,
            jwks_url,
            hmac_secret,
            subject_claim,
            role_claim,
            default_role,
            leeway_seconds,
        } = j;
        proto::JwtIssuer {
            name: name.clone(),
            issuer: issuer.clone(),
            audiences: audiences.clone(),
            algorithms: algorithms.clone(),
            public_keys_pem: public_keys_pem.clone(),
            jwks_url: jwks_url.clone(),
            hmac_secret: hmac_secret.clone(),
            subject_claim: subject_claim.clone(),
            role_claim: role_claim.clone(),
            default_role: default_role.clone(),
            leeway_seconds: *leeway_seconds,
        }
    }
}

impl From<proto::JwtIssuer> for JwtIssuerSpec {
    fn from(j: proto::JwtIssuer) -> Self {
        let proto::JwtIssuer {
            name,
            issuer,
            audiences,
            algorithms,
            public_keys_pem,
            jwks_url,
            hmac_secret,
            subject_claim,
            role_claim,
            default_role,
            leeway_seconds,
        } = j;
        JwtIssuerSpec {
            name,
            issuer,
            audiences,
            algorithms,
            public_keys_pem,
            jwks_url,
            hmac_secret,
            subject_claim,
            role_claim,
            default_role,
            leeway_seconds,
        }
    }
}

impl From<&RedactionRuleSpec> for proto::RedactionRule {
    fn from(r: &RedactionRuleSpec) -> Self {
        let RedactionRuleSpec {
            key_pattern,
            replacement,
        } = r;
        proto::RedactionRule {
            key_pattern: key_pattern.clone(),
            replacement: replacement.clone(),
        }
    }
}

impl From<proto::RedactionRule> for RedactionRuleSpec {
    fn from(r: proto::RedactionRule) -> Self {
        let proto::RedactionRule {
            key_pattern,
            replacement,
        } = r;
        RedactionRuleSpec {
            key_pattern,
            replacement,
        }
    }
}

impl From<&AuditSpec> for proto::AuditSettings {
    fn from(a: &AuditSpec) -> Self {
        let AuditSpec {
            max_argument_bytes,
            max_response_bytes,
            extra_methods,
            retention_days,
        } = a;
        proto::AuditSettings {
            max_argument_bytes: *max_argument_bytes,
            max_response_bytes: *max_response_bytes,
            extra_methods: extra_methods.clone(),
            retention_days: *retention_days,
        }
    }
}

impl From<proto::AuditSettings> for AuditSpec {
    fn from(a: proto::AuditSettings) -> Self {
        let proto::AuditSettings {
            max_argument_bytes,
            max_response_bytes,
            extra_methods,
            retention_days,
        } = a;
        AuditSpec {
            max_argument_bytes,
            max_response_bytes,
            extra_methods,
            retention_days,
        }
    }
}

impl From<&FederationSpec> for proto::FederationSettings {
    fn from(f: &FederationSpec) -> Self {
        let FederationSpec {
            prefix_mode,
            separator,
        } = f;
        proto::FederationSettings {
            prefix_mode: match prefix_mode {
                PrefixMode::Always => proto::federation_settings::PrefixMode::Always as i32,
                PrefixMode::OnCollision => {
                    proto::federation_settings::PrefixMode::OnCollision as i32
                }
            },
            separator: separator.clone(),
        }
    }
}

impl From<proto::FederationSettings> for FederationSpec {
    fn from(f: proto::FederationSettings) -> Self {
        let proto::FederationSettings {
            prefix_mode,
            separator,
        } = f;
        let prefix_mode = match proto::federation_settings::PrefixMode::try_from(prefix_mode) {
            Ok(proto::federation_settings::PrefixMode::OnCollision) => PrefixMode::OnCollision,
            _ => PrefixMode::Always,
        };
        let separator = if separator.is_empty() {
            DEFAULT_SEPARATOR.to_string()
        } else {
            separator
        };
        FederationSpec {
            prefix_mode,
            separator,
        }
    }
}

impl From<&PolicySpec> for proto::PolicySpec {
    fn from(s: &PolicySpec) -> Self {
        let PolicySpec {
            roles,
            backends,
            jwt_issuers,
            redaction_rules,
            audit,
            federation,
        } = s;
        proto::PolicySpec {
            roles: roles.iter().map(Into::into).collect(),
            backends: backends.iter().map(Into::into).collect(),
            jwt_issuers: jwt_issuers.iter().map(Into::into).collect(),
            redaction_rules: redaction_rules.iter().map(Into::into).collect(),
            audit: Some(audit.into()),
            federation: Some(federation.into()),
        }
    }
}

impl TryFrom<proto::PolicySpec> for PolicySpec {
    type Error = ValidationErrors;
    fn try_from(s: proto::PolicySpec) -> Result<Self, Self::Error> {
        let proto::PolicySpec {
            roles,
            backends,
            jwt_issuers,
            redaction_rules,
            audit,
            federation,
        } = s;
        let mut errs = ValidationErrors::default();
        let mut out_roles = Vec::with_capacity(roles.len());
        for (i, r) in roles.into_iter().enumerate() {
            match RoleSpec::try_from(r) {
                Ok(r) => out_roles.push(r),
                Err(e) => errs.0.extend(e.nest(&format!("roles[{i}]")).0),
            }
        }
        errs.into_result()?;
        Ok(PolicySpec {
            roles: out_roles,
            backends: backends.into_iter().map(Into::into).collect(),
            jwt_issuers: jwt_issuers.into_iter().map(Into::into).collect(),
            redaction_rules: redaction_rules.into_iter().map(Into::into).collect(),
            audit: audit.map(Into::into).unwrap_or_default(),
            federation: federation.map(Into::into).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PolicySpec {
        PolicySpec {
            roles: vec![RoleSpec {
                name: "ops".into(),
                allow: vec!["everything/*".into(), "echo".into()],
                deny: vec!["everything/trigger-*".into()],
                rate_limits: vec![RateLimitSpec {
                    per_second: 5.0,
                    burst: 10,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            backends: vec![BackendSpec {
                name: "everything".into(),
                url: Some("http://127.0.0.1:3001/mcp".into()),
                headers: [("Authorization".to_string(), "Bearer upstream".to_string())].into(),
                ..Default::default()
            }],
            jwt_issuers: vec![JwtIssuerSpec {
                name: "idp".into(),
                issuer: "https://idp.example".into(),
                audiences: vec!["sentinel".into()],
                algorithms: vec!["HS256".into()],
                hmac_secret: "x".repeat(32),
                default_role: "ops".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_good_policy_validates_and_round_trips_through_proto() {
        let spec = sample();
        spec.validate().unwrap();
        let back = PolicySpec::try_from(proto::PolicySpec::from(&spec)).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn backend_urls_must_be_http_with_a_host_and_no_credentials() {
        for good in ["http://127.0.0.1:9000/mcp", "https://tools.example/mcp"] {
            assert_eq!(validate_http_url(good), Ok(()), "{good}");
        }
        for bad in [
            "ftp://x",
            "/mcp",
            "http://user:secret@tools.example/mcp",
            "https://token@tools.example/",
        ] {
            assert!(validate_http_url(bad).is_err(), "{bad}");
        }
        let m = validate_http_url("http://user:secret@tools.example/mcp").unwrap_err();
        assert!(!m.contains("secret"), "{m}");
    }

    #[test]
    fn errors_name_every_bad_field() {
        let mut spec = sample();
        spec.roles[0].name = "bad name".into();
        spec.roles[0].allow.push("[".into());
        spec.roles[0].rate_limits[0].burst = 0;
        spec.backends[0].url = Some("ftp://x".into());
        spec.backends[0].headers.insert("Host".into(), "x".into());
        spec.jwt_issuers[0].algorithms = vec!["none".into()];
        spec.jwt_issuers[0].default_role = "ghost".into();
        spec.federation.separator = "!!".into();
        let errs = spec.validate().unwrap_err();
        let fields: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
        for want in [
            "roles[0].name",
            "roles[0].allow[2]",
            "roles[0].rate_limits[0].burst",
            "backends[0].url",
            "backends[0].headers.Host",
            "jwt_issuers[0].algorithms[0]",
            "jwt_issuers[0].default_role",
            "federation.separator",
        ] {
            assert!(fields.contains(&want), "missing {want} in {errs}");
        }
    }

    #[test]
    fn algorithm_confusion_is_refused() {
        let mut spec = sample();
        spec.jwt_issuers[0].algorithms = vec!["HS256".into(), "RS256".into()];
        let errs = spec.validate().unwrap_err();
        assert!(errs.to_string().contains("must not mix"), "{errs}");
    }

    #[test]
    fn duplicates_are_refused() {
        let mut spec = sample();
        spec.roles.push(spec.roles[0].clone());
        spec.backends.push(spec.backends[0].clone());
        let errs = spec.validate().unwrap_err().to_string();
        assert!(errs.contains("duplicate role"), "{errs}");
        assert!(errs.contains("duplicate backend"), "{errs}");
    }

    #[test]
    fn redaction_hides_and_restore_keeps_secrets() {
        let spec = sample();
        let shown = spec.redacted();
        assert_eq!(shown.backends[0].headers["Authorization"], REDACTED);
        assert_eq!(shown.jwt_issuers[0].hmac_secret, REDACTED);
        let text = serde_json::to_string(&shown).unwrap();
        assert!(!text.contains("Bearer upstream"));
        let mut back = shown.clone();
        back.restore_secrets(&spec).unwrap();
        assert_eq!(back, spec);
        let mut orphan = shown;
        orphan.backends[0].name = "other".into();
        let errs = orphan.restore_secrets(&spec).unwrap_err();
        assert_eq!(errs.0[0].field, "backends[0].headers.Authorization");
    }

    #[test]
    fn json_documents_parse_with_defaults() {
        let spec: PolicySpec = serde_json::from_value(serde_json::json!({
            "roles": [{"name": "reader", "allow": ["everything/echo"]}],
            "backends": [{"name": "everything", "url": "http://127.0.0.1:3001/mcp"}]
        }))
        .unwrap();
        assert_eq!(spec.federation.separator, "__");
        assert_eq!(spec.audit.max_argument_bytes, DEFAULT_MAX_ARGUMENT_BYTES);
        spec.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err =
            serde_json::from_value::<PolicySpec>(serde_json::json!({"rolez": []})).unwrap_err();
        assert!(err.to_string().contains("rolez"));
    }

    #[test]
    fn diff_lines_name_changes() {
        let old = sample();
        let mut new = old.clone();
        new.roles[0].allow.push("x".into());
        new.backends.clear();
        new.roles.push(RoleSpec {
            name: "new".into(),
            ..Default::default()
        });
        let lines = new.diff_lines(&old);
        assert_eq!(
            lines,
            vec!["~ role ops", "+ role new", "- backend everything"]
        );
    }
}
