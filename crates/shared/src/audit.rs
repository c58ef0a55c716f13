//! The audit event: outcomes, argument redaction and bounding, the hash
//! chain, and the validation the control plane applies on ingest.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use prost::Message;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::proto::{AuditEvent, Outcome};
use crate::spec::RedactionRuleSpec;

/// The audit outcome as text: the `outcome` column, the metric label and the
/// query filter all use these words.
pub fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Unspecified => "unspecified",
        Outcome::Ok => "ok",
        Outcome::Unauthenticated => "unauthenticated",
        Outcome::Forbidden => "forbidden",
        Outcome::RateLimited => "rate_limited",
        Outcome::UpstreamError => "upstream_error",
        Outcome::Unknown => "unknown",
        Outcome::InvalidRequest => "invalid_request",
    }
}

/// Parses an outcome word; `None` for anything not in [`outcome_str`].
pub fn parse_outcome(s: &str) -> Option<Outcome> {
    Some(match s {
        "ok" => Outcome::Ok,
        "unauthenticated" => Outcome::Unauthenticated,
        "forbidden" => Outcome::Forbidden,
        "rate_limited" => Outcome::RateLimited,
        "upstream_error" => Outcome::UpstreamError,
        "unknown" => Outcome::Unknown,
        "invalid_request" => Outcome::InvalidRequest,
        _ => return None,
    })
}

pub const OUTCOMES: &[&str] = &[
    "ok",
    "unauthenticated",
    "forbidden",
    "rate_limited",
    "upstream_error",
    "unknown",
    "invalid_request",
];

/// Replaces the values of argument keys that match a redaction rule, at any
/// depth, before anything is written to the audit log.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    set: Option<GlobSet>,
    replacements: Vec<String>,
}

impl Redactor {
    pub fn new(rules: &[RedactionRuleSpec]) -> Result<Self, String> {
        if rules.is_empty() {
            return Ok(Self::default());
        }
        let mut b = GlobSetBuilder::new();
        for r in rules {
            b.add(
                GlobBuilder::new(&r.key_pattern)
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| format!("pattern '{}': {}", r.key_pattern, e.kind()))?,
            );
        }
        Ok(Self {
            set: Some(b.build().map_err(|e| e.to_string())?),
            replacements: rules.iter().map(|r| r.replacement.clone()).collect(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_none()
    }

    /// Redacts `value` in place; returns how many values were replaced.
    pub fn redact(&self, value: &mut Value) -> usize {
        let Some(set) = &self.set else { return 0 };
        self.walk(set, value)
    }

    fn walk(&self, set: &GlobSet, value: &mut Value) -> usize {
        match value {
            Value::Object(map) => {
                let mut n = 0;
                for (k, v) in map.iter_mut() {
                    if let Some(&i) = set.matches(k).first() {
                        *v = Value::String(self.replacements[i].clone());
                        n += 1;
                    } else {
                        n += self.walk(set, v);
                    }
                }
                n
            }
            Value::Array(items) => items.iter_mut().map(|v| self.walk(set, v)).sum(),
            _ => 0,
        }
    }
}

/// Redacts and bounds a raw JSON arguments document for the audit log.
/// Returns the text to store and whether it was cut. With no redaction rule
/// the raw text is kept as the client sent it (no parse, no re-serialise).
pub fn audit_arguments(raw: &str, redactor: &Redactor, max_bytes: usize) -> (String, bool) {
    if max_bytes == 0 {
        return (String::new(), !raw.is_empty());
    }
    if redactor.is_empty() {
        return bound_text(raw.trim(), max_bytes);
    }
    match serde_json::from_str::<Value>(raw) {
        Ok(mut v) => {
            redactor.redact(&mut v);
            bound_text(&v.to_string(), max_bytes)
        }
        // Unparseable arguments are recorded as an empty marker rather than
        // raw: redaction could not be applied to them.
        Err(_) => (r#"{"$unparseable":true}"#.to_string(), true),
    }
}

/// Bounds a JSON text to about `max_bytes`. A cut document is replaced by a
/// small JSON object holding its size and a prefix, so the stored text is
/// always valid JSON.
pub fn bound_text(text: &str, max_bytes: usize) -> (String, bool) {
    if text.len() <= max_bytes {
        return (text.to_string(), false);
    }
    let mut cut = max_bytes.min(text.len());
    while cut > 0 && !text.is_char_boundary(cut) {
        cut -= 1;
    }
    // Written straight to text (no `Value` holding a copy of the prefix),
    // keys in the order `json!` would sort them.
    #[derive(serde::Serialize)]
    struct Truncated<'a> {
        #[serde(rename = "$truncated")]
        truncated: bool,
        bytes: usize,
        prefix: &'a str,
    }
    let wrapped = Truncated {
        truncated: true,
        bytes: text.len(),
        prefix: &text[..cut],
    };
    (serde_json::to_string(&wrapped).unwrap_or_default(), true)
}

/// SHA-256 over the protobuf encoding of `ev` with `hash` left empty.
///
/// `hash` is the highest-numbered field and prost encodes fields in number
/// order, so the encoding with `hash` empty is the full encoding minus its
/// last field: no copy of the event is needed.
pub fn event_hash(ev: &AuditEvent) -> [u8; 32] {
    thread_local! {
        // One encoding buffer per thread, reused: the shipper seals and the
        // control plane checks every event, and a fresh buffer per event
        // cost an allocation and a cold copy of its 1-2 KB.
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let hash_len = if ev.hash.is_empty() {
        0
    } else {
        prost::encoding::key_len(27)
            + prost::encoding::encoded_len_varint(ev.hash.len() as u64)
            + ev.hash.len()
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            ev.encode_raw(&mut *buf);
            let digest = Sha256::digest(&buf[..buf.len() - hash_len]).into();
            // An outsized event does not keep its buffer.
            if buf.capacity() > SCRATCH_KEEP {
                *buf = Vec::new();
            }
            digest
        }
        Err(_) => {
            let full = ev.encode_to_vec();
            Sha256::digest(&full[..full.len() - hash_len]).into()
        }
    })
}

/// Largest encoding buffer [`event_hash`] keeps between events.
const SCRATCH_KEEP: usize = 256 * 1024;

/// Sets `prev_hash` and `hash`: links `ev` into its proxy's chain.
pub fn seal(ev: &mut AuditEvent, prev_hash: &[u8]) {
    ev.prev_hash = prev_hash.to_vec();
    ev.hash.clear();
    ev.hash = event_hash(ev).to_vec();
}

/// Whether `ev.hash` is the hash of its content.
pub fn hash_ok(ev: &AuditEvent) -> bool {
    ev.hash.len() == 32 && crate::keys::secrets_equal(&event_hash(ev), &ev.hash)
}

/// Largest text field accepted on ingest, bytes.
pub const MAX_FIELD_BYTES: usize = 64 * 1024;
/// Largest arguments or response document accepted on ingest, bytes.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024 + 1024;

/// Checks an event before it is stored. The message names the field.
pub fn validate_event(ev: &AuditEvent) -> Result<(), String> {
    match uuid::Uuid::parse_str(&ev.event_id) {
        Ok(_) => {}
        Err(_) => return Err("event_id: must be a UUID".into()),
    }
    if ev.proxy_id.is_empty() {
        return Err("proxy_id: must not be empty".into());
    }
    if ev.sequence == 0 || ev.sequence > i64::MAX as u64 {
        return Err("sequence: must be between 1 and 2^63-1".into());
    }
    if ev.epoch == 0 || ev.epoch > i64::MAX as u64 {
        return Err("epoch: must be between 1 and 2^63-1".into());
    }
    if ev.latency_us > i64::MAX as u64 {
        return Err("latency_us: out of range".into());
    }
    // 2000-01-01 .. 2200-01-01 in unix microseconds.
    if !(946_684_800_000_000..7_258_118_400_000_000).contains(&ev.timestamp_us) {
        return Err("timestamp_us: out of range".into());
    }
    match Outcome::try_from(ev.outcome) {
        Ok(Outcome::Unspecified) | Err(_) => return Err("outcome: unknown value".into()),
        Ok(_) => {}
    }
    if ev.http_status > 999 {
        return Err("http_status: out of range".into());
    }
    if ev.mcp_method.is_empty() {
        return Err("mcp_method: must not be empty".into());
    }
    let fields: [(&str, &str, usize); 16] = [
        ("event_id", &ev.event_id, MAX_FIELD_BYTES),
        ("request_id", &ev.request_id, MAX_FIELD_BYTES),
        ("proxy_id", &ev.proxy_id, MAX_FIELD_BYTES),
        ("subject", &ev.subject, MAX_FIELD_BYTES),
        ("role", &ev.role, MAX_FIELD_BYTES),
        ("api_key_id", &ev.api_key_id, MAX_FIELD_BYTES),
        ("auth_method", &ev.auth_method, MAX_FIELD_BYTES),
        ("session_id", &ev.session_id, MAX_FIELD_BYTES),
        ("mcp_method", &ev.mcp_method, MAX_FIELD_BYTES),
        ("tool", &ev.tool, MAX_FIELD_BYTES),
        ("backend", &ev.backend, MAX_FIELD_BYTES),
        ("arguments", &ev.arguments, MAX_DOCUMENT_BYTES),
        ("response", &ev.response, MAX_DOCUMENT_BYTES),
        (
            "jsonrpc_error_message",
            &ev.jsonrpc_error_message,
            MAX_FIELD_BYTES,
        ),
        ("decision", &ev.decision, MAX_DOCUMENT_BYTES),
        ("protocol_version", &ev.protocol_version, MAX_FIELD_BYTES),
    ];
    for (name, value, max) in fields {
        if value.len() > max {
            return Err(format!("{name}: longer than {max} bytes"));
        }
        // Postgres text cannot hold NUL.
        if value.as_bytes().contains(&0) {
            return Err(format!("{name}: contains a NUL character"));
        }
    }
    if ev.client_name.len() > MAX_FIELD_BYTES || ev.client_name.as_bytes().contains(&0) {
        return Err("client_name: too long or contains NUL".into());
    }
    if !(ev.prev_hash.is_empty() || ev.prev_hash.len() == 32) {
        return Err("prev_hash: must be empty or 32 bytes".into());
    }
    if ev.hash.len() != 32 {
        return Err("hash: must be 32 bytes".into());
    }
    Ok(())
}

/// Replaces NUL characters, which Postgres text cannot store, so that input
/// a client controls can never make an event unstorable.
pub fn scrub(s: &str) -> std::borrow::Cow<'_, str> {
    if s.as_bytes().contains(&0) {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> AuditEvent {
        AuditEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            request_id: "r1".into(),
            timestamp_us: 1_790_000_000_000_000,
            proxy_id: "p1".into(),
            epoch: 1_790_000_000_000_000,
            sequence: 1,
            mcp_method: "tools/call".into(),
            tool: "echo".into(),
            outcome: Outcome::Ok as i32,
            http_status: 200,
            ..Default::default()
        }
    }

    #[test]
    fn hash_ignores_its_own_field_and_detects_tampering() {
        let mut a = event();
        seal(&mut a, &[]);
        assert!(hash_ok(&a));
        let mut b = a.clone();
        b.tool = "other".into();
        assert!(!hash_ok(&b));
        let mut c = a.clone();
        c.prev_hash = vec![9; 32];
        assert!(!hash_ok(&c));
        // Hash of the sealed event equals the hash computed with `hash` empty.
        let mut d = a.clone();
        d.hash.clear();
        assert_eq!(event_hash(&d).to_vec(), a.hash);
    }

    #[test]
    fn chain_links() {
        let mut a = event();
        seal(&mut a, &[]);
        let mut b = event();
        b.sequence = 2;
        seal(&mut b, &a.hash);
        assert_eq!(b.prev_hash, a.hash);
        assert!(hash_ok(&b));
    }

    #[test]
    fn redaction_at_any_depth_case_insensitive() {
        let r = Redactor::new(&[
            RedactionRuleSpec {
                key_pattern: "*password*".into(),
                replacement: "[X]".into(),
            },
            RedactionRuleSpec {
                key_pattern: "token".into(),
                replacement: "[T]".into(),
            },
        ])
        .unwrap();
        let raw = r#"{"user":"a","Password":"p","nested":{"list":[{"TOKEN":"t","ok":1}],"db_password_2":"q"}}"#;
        let (out, cut) = audit_arguments(raw, &r, 4096);
        assert!(!cut);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["Password"], "[X]");
        assert_eq!(v["nested"]["list"][0]["TOKEN"], "[T]");
        assert_eq!(v["nested"]["list"][0]["ok"], 1);
        assert_eq!(v["nested"]["db_password_2"], "[X]");
        assert_eq!(v["user"], "a");
    }

    #[test]
    fn bounding_keeps_valid_json() {
        let big = format!(r#"{{"text":"{}"}}"#, "é".repeat(5000));
        let (out, cut) = audit_arguments(&big, &Redactor::default(), 100);
        assert!(cut);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["$truncated"], true);
        assert!(out.len() < 400);
        let (none, cut) = audit_arguments(&big, &Redactor::default(), 0);
        assert!(none.is_empty() && cut);
        // The same text a `Value` of the wrapper would print: stored records
        // and their hashes do not change with how it is written.
        let (wrapped, _) = bound_text(&big, 101);
        let expected = serde_json::json!({
            "$truncated": true, "bytes": big.len(), "prefix": &big[..101]
        });
        assert_eq!(wrapped, expected.to_string());
    }

    #[test]
    fn unparseable_arguments_are_not_stored_raw_when_redacting() {
        let r = Redactor::new(&[RedactionRuleSpec {
            key_pattern: "x".into(),
            replacement: "y".into(),
        }])
        .unwrap();
        let (out, cut) = audit_arguments("{not json", &r, 100);
        assert!(cut);
        assert!(!out.contains("not json"));
    }

    #[test]
    fn validation_names_fields() {
        let mut e = event();
        seal(&mut e, &[]);
        validate_event(&e).unwrap();
        let mut bad = e.clone();
        bad.event_id = "nope".into();
        assert!(validate_event(&bad).unwrap_err().starts_with("event_id"));
        let mut bad = e.clone();
        bad.subject = "a\0b".into();
        assert!(validate_event(&bad).unwrap_err().starts_with("subject"));
        let mut bad = e.clone();
        bad.outcome = 99;
        assert!(validate_event(&bad).unwrap_err().starts_with("outcome"));
        let mut bad = e;
        bad.sequence = 0;
        assert!(validate_event(&bad).unwrap_err().starts_with("sequence"));
    }

    #[test]
    fn outcomes_round_trip() {
        for w in OUTCOMES {
            assert_eq!(outcome_str(parse_outcome(w).unwrap()), *w);
        }
        assert_eq!(parse_outcome("nope"), None);
    }

    #[test]
    fn scrub_removes_nul() {
        assert_eq!(scrub("a\0b"), "a\u{FFFD}b");
        assert!(matches!(scrub("ab"), std::borrow::Cow::Borrowed(_)));
    }
}

/// A UUIDv7 event id whose embedded time is `timestamp_us`'s millisecond,
/// as ingest requires (an id made by `now_v7()` a moment before or after
/// the timestamp can fall in another millisecond and be dead-lettered).
pub fn event_id_at(timestamp_us: i64) -> String {
    let ms = timestamp_us.max(0) as u64 / 1000;
    v7_at_millis(ms).hyphenated().to_string()
}

/// A UUIDv7 for now. Unlike `Uuid::now_v7()`, whose random bits come from
/// one `getrandom` system call per id, these come from the thread's
/// CSPRNG (seeded from the OS, reseeded by `rand`): the proxy makes two ids
/// per tools/call, and the system calls were a fifth of its syscalls.
pub fn uuid_v7_now() -> uuid::Uuid {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    v7_at_millis(ms)
}

fn v7_at_millis(ms: u64) -> uuid::Uuid {
    let mut random = [0u8; 10];
    rand::fill(&mut random[..]);
    uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid()
}

#[cfg(test)]
mod event_id_tests {
    #[test]
    fn the_id_carries_the_timestamps_millisecond() {
        for ts in [0i64, 1_795_000_000_123_999, 1_795_000_000_124_000] {
            let id = uuid::Uuid::parse_str(&super::event_id_at(ts)).unwrap();
            let (s, n) = id.get_timestamp().unwrap().to_unix();
            assert_eq!(s as i64 * 1000 + (n / 1_000_000) as i64, ts / 1000);
            assert_eq!(id.get_version_num(), 7);
        }
    }

    #[test]
    fn ids_made_now_are_v7_distinct_and_carry_the_current_time() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| super::uuid_v7_now()).collect();
        assert_eq!(ids.len(), 1000);
        for id in ids.iter().take(10) {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            let (s, n) = id.get_timestamp().unwrap().to_unix();
            let ms = s * 1000 + u64::from(n / 1_000_000);
            assert!(ms >= before && ms < before + 60_000, "{ms} vs {before}");
        }
    }
}
