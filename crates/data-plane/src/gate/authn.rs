//! Authentication: turns the credential on a request into a [`Principal`].
//!
//! This is the only place a `Principal` can be made (its fields are
//! private), so no later code can invent or alter an identity. API keys
//! (`Authorization: Bearer sntl_...` or `X-API-Key`) are checked against the
//! hashes in the snapshot in constant time; anything else presented as a
//! bearer token is tried as a JWT against the configured issuers.

use std::str::FromStr;

use http::HeaderMap;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use sentinel_shared::keys::{self, KeyKind};
use sentinel_shared::spec::JwtIssuerSpec;
use serde_json::{Map, Value};

use crate::policy::Snapshot;
use crate::upstream::http::UpstreamClient;

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ApiKey,
    Jwt,
}

impl AuthMethod {
    /// The word recorded in the audit event.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ApiKey => "api_key",
            AuthMethod::Jwt => "jwt",
        }
    }
}

/// An authenticated caller. Only [`authenticate`] constructs one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    subject: String,
    role: String,
    key_id: Option<String>,
    method: AuthMethod,
    /// Computed once: sessions and rate-limit buckets are keyed by it.
    binding: String,
}

impl Principal {
    pub fn subject(&self) -> &str {
        &self.subject
    }
    pub fn role(&self) -> &str {
        &self.role
    }
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }
    pub fn method(&self) -> AuthMethod {
        self.method
    }
    /// What a session is bound to: the same key (not merely the same owner),
    /// or the same subject of the same JWT issuer. Also the per-key rate
    /// limit bucket.
    pub fn binding(&self) -> &str {
        &self.binding
    }

    /// The binding as the rate limiter's bucket key (no copy per call).
    pub(crate) fn bucket(&self) -> &String {
        &self.binding
    }
}

fn binding_of(key_id: Option<&str>, issuer: Option<&str>, subject: &str) -> String {
    match (key_id, issuer) {
        (Some(id), _) => format!("key:{id}"),
        (None, Some(iss)) => format!("jwt:{iss}:{subject}"),
        (None, None) => format!("subject:{subject}"),
    }
}

/// Why no principal could be made. The detail goes to the audit decision and
/// the log; the client only learns that authentication is required.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    #[error("no credential presented")]
    Missing,
    #[error("malformed credential: {0}")]
    Malformed(String),
    #[error("unknown api key '{0}'")]
    UnknownKey(String),
    #[error("api key '{0}' does not match its stored hash")]
    BadSecret(String),
    #[error("api key '{0}' has expired")]
    Expired(String),
    #[error("token rejected: {0}")]
    InvalidToken(String),
    #[error("token carries no role and its issuer has no default role")]
    NoRole,
}

impl Unauthenticated {
    /// Whether a credential was presented at all (RFC 6750: only then does
    /// `WWW-Authenticate` carry `error="invalid_token"`).
    pub fn presented(&self) -> bool {
        !matches!(self, Unauthenticated::Missing)
    }
}

/// Authenticates the request carried by `headers` at wall time `now_us`.
/// Awaits only when a JWT names a key its issuer's JWKS does not hold yet.
pub async fn authenticate(
    headers: &HeaderMap,
    snap: &Snapshot,
    now_us: i64,
) -> Result<Principal, Unauthenticated> {
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .map(|v| {
            let v = v
                .to_str()
                .map_err(|_| Unauthenticated::Malformed("authorization header".into()))?;
            match v.split_once(' ') {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => {
                    Ok(rest.trim().to_string())
                }
                _ => Err(Unauthenticated::Malformed(
                    "authorization scheme must be Bearer".into(),
                )),
            }
        })
        .transpose()?;
    let api_key = headers
        .get("x-api-key")
        .map(|v| {
            v.to_str()
                .map(|s| s.trim().to_string())
                .map_err(|_| Unauthenticated::Malformed("x-api-key header".into()))
        })
        .transpose()?;
    let credential = match (bearer, api_key) {
        (Some(b), _) => b,
        (None, Some(k)) => {
            return check_api_key(&k, snap, now_us);
        }
        (None, None) => return Err(Unauthenticated::Missing),
    };
    if credential.starts_with(KeyKind::Api.prefix()) {
        check_api_key(&credential, snap, now_us)
    } else if credential.bytes().filter(|&b| b == b'.').count() == 2 {
        check_jwt(&credential, snap).await
    } else {
        Err(Unauthenticated::Malformed(
            "bearer token is neither an api key nor a jwt".into(),
        ))
    }
}

fn check_api_key(text: &str, snap: &Snapshot, now_us: i64) -> Result<Principal, Unauthenticated> {
    let id =
        keys::parse(KeyKind::Api, text).map_err(|e| Unauthenticated::Malformed(e.to_string()))?;
    let Some(entry) = snap.policy.key(id) else {
        return Err(Unauthenticated::UnknownKey(id.to_string()));
    };
    if !keys::verify_hash(text, &entry.hash) {
        return Err(Unauthenticated::BadSecret(id.to_string()));
    }
    if entry.expires_at_us.is_some_and(|exp| exp <= now_us) {
        return Err(Unauthenticated::Expired(id.to_string()));
    }
    Ok(Principal {
        subject: if entry.owner.is_empty() {
            entry.id.clone()
        } else {
            entry.owner.clone()
        },
        role: entry.role.clone(),
        key_id: Some(entry.id.clone()),
        method: AuthMethod::ApiKey,
        binding: binding_of(Some(&entry.id), None, ""),
    })
}

async fn check_jwt(token: &str, snap: &Snapshot) -> Result<Principal, Unauthenticated> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| Unauthenticated::InvalidToken(format!("header: {e}")))?;
    let mut last = Unauthenticated::InvalidToken("no issuer accepts this token".into());
    for v in snap
        .jwt
        .iter()
        .filter(|v| v.algorithms.contains(&header.alg))
    {
        match v.verify(token, header.alg, header.kid.as_deref()).await {
            Ok(p) => return Ok(p),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A JWT issuer compiled from the policy: keys parsed once per snapshot.
pub struct JwtVerifier {
    name: String,
    algorithms: Vec<Algorithm>,
    keys: Vec<(AlgorithmFamily, DecodingKey)>,
    /// Keys fetched from the issuer's JWKS URL, when it has one.
    jwks: Option<Jwks>,
    validation: Validation,
    subject_claim: String,
    role_claim: String,
    default_role: String,
    /// The issuer URL, advertised in protected-resource metadata.
    pub issuer: String,
}

impl JwtVerifier {
    pub fn new(spec: &JwtIssuerSpec, http: UpstreamClient) -> Result<Self, String> {
        let mut algorithms = Vec::with_capacity(spec.algorithms.len());
        for a in &spec.algorithms {
            algorithms
                .push(Algorithm::from_str(a).map_err(|_| format!("unsupported algorithm '{a}'"))?);
        }
        let Some(&first) = algorithms.first() else {
            return Err("no algorithm".into());
        };
        let mut keys = Vec::new();
        if !spec.hmac_secret.is_empty() {
            keys.push((
                AlgorithmFamily::Hmac,
                DecodingKey::from_secret(spec.hmac_secret.as_bytes()),
            ));
        }
        for (i, pem) in spec.public_keys_pem.iter().enumerate() {
            let b = pem.as_bytes();
            let parsed = DecodingKey::from_rsa_pem(b)
                .map(|k| (AlgorithmFamily::Rsa, k))
                .or_else(|_| DecodingKey::from_ec_pem(b).map(|k| (AlgorithmFamily::Ec, k)))
                .or_else(|_| DecodingKey::from_ed_pem(b).map(|k| (AlgorithmFamily::Ed, k)))
                .map_err(|e| format!("public_keys_pem[{i}]: {e}"))?;
            keys.push(parsed);
        }
        let jwks = (!spec.jwks_url.is_empty()).then(|| Jwks::new(&spec.jwks_url, http));
        let mut validation = Validation::new(first);
        validation.algorithms = algorithms.clone();
        validation.set_issuer(&[&spec.issuer]);
        validation.set_audience(&spec.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = u64::from(spec.leeway_seconds);
        validation.validate_nbf = true;
        Ok(Self {
            name: spec.name.clone(),
            algorithms,
            keys,
            jwks,
            validation,
            subject_claim: non_empty_or(&spec.subject_claim, "sub"),
            role_claim: non_empty_or(&spec.role_claim, "role"),
            default_role: spec.default_role.clone(),
            issuer: spec.issuer.clone(),
        })
    }

    async fn verify(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Principal, Unauthenticated> {
        let family = alg.family();
        let mut last = Unauthenticated::InvalidToken(format!("issuer '{}' has no key", self.name));
        let fetched;
        let candidates: Vec<&DecodingKey> = match &self.jwks {
            Some(jwks) => {
                fetched = jwks.keys_for(kid).await;
                fetched.iter().filter(|k| k.family() == family).collect()
            }
            None => self
                .keys
                .iter()
                .filter(|(f, _)| *f == family)
                .map(|(_, k)| k)
                .collect(),
        };
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation) {
                Ok(data) => return self.principal(data.claims),
                Err(e) => last = Unauthenticated::InvalidToken(e.to_string()),
            }
        }
        Err(last)
    }

    fn principal(&self, claims: Map<String, Value>) -> Result<Principal, Unauthenticated> {
        let subject = claims
            .get(&self.subject_claim)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Unauthenticated::InvalidToken(format!("claim '{}' missing", self.subject_claim))
            })?
            .to_string();
        let role = match claims.get(&self.role_claim).and_then(Value::as_str) {
            Some(r) if !r.is_empty() => r.to_string(),
            _ if !self.default_role.is_empty() => self.default_role.clone(),
            _ => return Err(Unauthenticated::NoRole),
        };
        Ok(Principal {
            binding: binding_of(None, Some(&self.name), &subject),
            subject,
            role,
            key_id: None,
            method: AuthMethod::Jwt,
        })
    }
}

/// Keys of a JWKS with their key ids.
type KidKeys = Vec<(Option<String>, DecodingKey)>;

/// An issuer's JWKS: fetched on first use, cached, and fetched again when a
/// token names a key id the cache does not hold (the issuer rotated), at
/// most once per `Jwks::MIN_REFRESH` so unknown ids cannot make the proxy
/// hammer the issuer.
pub struct Jwks {
    url: String,
    http: UpstreamClient,
    keys: std::sync::RwLock<std::sync::Arc<KidKeys>>,
    last_fetch: std::sync::Mutex<Option<std::time::Instant>>,
    fetching: tokio::sync::Mutex<()>,
}

impl Jwks {
    const MIN_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);
    const MAX_BYTES: usize = 256 * 1024;

    fn new(url: &str, http: UpstreamClient) -> Self {
        Self {
            url: url.to_string(),
            http,
            keys: std::sync::RwLock::new(std::sync::Arc::new(Vec::new())),
            last_fetch: std::sync::Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self) -> std::sync::Arc<KidKeys> {
        match self.keys.read() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn select(all: &[(Option<String>, DecodingKey)], kid: Option<&str>) -> Vec<DecodingKey> {
        all.iter()
            .filter(|(k, _)| kid.is_none() || k.as_deref() == kid)
            .map(|(_, key)| key.clone())
            .collect()
    }

    /// Keys that may have signed a token naming `kid` (all keys without one).
    async fn keys_for(&self, kid: Option<&str>) -> Vec<DecodingKey> {
        let found = Self::select(&self.cached(), kid);
        if !found.is_empty() {
            return found;
        }
        let _one_at_a_time = self.fetching.lock().await;
        let found = Self::select(&self.cached(), kid);
        if !found.is_empty() {
            return found;
        }
        let due = {
            let last = match self.last_fetch.lock() {
                Ok(l) => *l,
                Err(p) => *p.into_inner(),
            };
            last.is_none_or(|t| t.elapsed() >= Self::MIN_REFRESH)
        };
        if due {
            match self.fetch().await {
                Ok(keys) => {
                    let keys = std::sync::Arc::new(keys);
                    match self.keys.write() {
                        Ok(mut w) => *w = keys,
                        Err(p) => *p.into_inner() = keys,
                    }
                }
                Err(e) => tracing::warn!(url = %self.url, error = %e, "jwks fetch failed"),
            }
            match self.last_fetch.lock() {
                Ok(mut l) => *l = Some(std::time::Instant::now()),
                Err(p) => *p.into_inner() = Some(std::time::Instant::now()),
            }
        }
        Self::select(&self.cached(), kid)
    }

    async fn fetch(&self) -> Result<KidKeys, String> {
        let body = self
            .http
            .get(
                &self.url,
                Self::MAX_BYTES,
                std::time::Duration::from_secs(5),
            )
            .await?;
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(set.keys.len());
        for jwk in &set.keys {
            match DecodingKey::from_jwk(jwk) {
                // Symmetric keys never come from a JWKS: that would be
                // algorithm confusion waiting to happen.
                Ok(k) if k.family() != AlgorithmFamily::Hmac => {
                    out.push((jwk.common.key_id.clone(), k))
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "jwk skipped"),
            }
        }
        Ok(out)
    }
}

fn non_empty_or(s: &str, default: &str) -> String {
    if s.is_empty() {
        default.to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::snapshot_with;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn token(claims: Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn api_keys_table() {
        let (snap, keys) = snapshot_with(SECRET);
        let now = 1_800_000_000_000_000;
        let good = &keys[0];
        let expired = &keys[1];
        let bearer = format!("Bearer {good}");
        let p = authenticate(&headers(&[("authorization", &bearer)]), &snap, now)
            .await
            .unwrap();
        assert_eq!(p.role(), "reader");
        assert_eq!(p.method(), AuthMethod::ApiKey);
        let p2 = authenticate(&headers(&[("x-api-key", good)]), &snap, now)
            .await
            .unwrap();
        assert_eq!(p, p2);
        type Case = (HeaderMap, fn(&Unauthenticated) -> bool);
        let cases: Vec<Case> = vec![
            (headers(&[]), |e| matches!(e, Unauthenticated::Missing)),
            (headers(&[("authorization", "Basic abc")]), |e| {
                matches!(e, Unauthenticated::Malformed(_))
            }),
            (headers(&[("x-api-key", "sntl_nope")]), |e| {
                matches!(e, Unauthenticated::Malformed(_))
            }),
            (
                headers(&[(
                    "x-api-key",
                    &sentinel_shared::keys::generate(KeyKind::Api).secret,
                )]),
                |e| matches!(e, Unauthenticated::UnknownKey(_)),
            ),
            (headers(&[("x-api-key", expired)]), |e| {
                matches!(e, Unauthenticated::Expired(_))
            }),
        ];
        for (i, (h, want)) in cases.into_iter().enumerate() {
            let err = authenticate(&h, &snap, now).await.unwrap_err();
            assert!(want(&err), "case {i}: {err:?}");
        }
        // Before its expiry the second key works.
        assert!(
            authenticate(&headers(&[("x-api-key", expired)]), &snap, 1)
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn jwt_claims_issuer_audience_and_algorithm() {
        let (snap, _) = snapshot_with(SECRET);
        let exp = jsonwebtoken::get_current_timestamp() + 600;
        let ok = token(
            json!({"sub":"alice","role":"reader","iss":"https://idp.test","aud":"sentinel","exp":exp}),
        );
        let p = authenticate(
            &headers(&[("authorization", &format!("Bearer {ok}"))]),
            &snap,
            0,
        )
        .await
        .unwrap();
        assert_eq!(
            (p.subject(), p.role(), p.method()),
            ("alice", "reader", AuthMethod::Jwt)
        );
        assert_eq!(p.binding(), "jwt:idp:alice");
        let bad = [
            json!({"sub":"a","role":"r","iss":"https://other","aud":"sentinel","exp":exp}),
            json!({"sub":"a","role":"r","iss":"https://idp.test","aud":"nope","exp":exp}),
            json!({"sub":"a","role":"r","iss":"https://idp.test","aud":"sentinel","exp":1}),
            json!({"sub":"a","role":"r","iss":"https://idp.test","aud":"sentinel"}),
            json!({"sub":"a","role":"r","aud":"sentinel","exp":exp}),
        ];
        for claims in bad {
            let t = token(claims.clone());
            let err = authenticate(
                &headers(&[("authorization", &format!("Bearer {t}"))]),
                &snap,
                0,
            )
            .await
            .unwrap_err();
            assert!(
                matches!(err, Unauthenticated::InvalidToken(_)),
                "{claims}: {err:?}"
            );
        }
        // alg=none and a different algorithm are refused.
        let none = format!(
            "{}.{}.",
            base64_url(r#"{"alg":"none","typ":"JWT"}"#),
            base64_url(
                &json!({"sub":"a","iss":"https://idp.test","aud":"sentinel","exp":exp}).to_string()
            )
        );
        assert!(
            authenticate(
                &headers(&[("authorization", &format!("Bearer {none}"))]),
                &snap,
                0
            )
            .await
            .is_err()
        );
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &json!({"sub":"a","role":"r","iss":"https://idp.test","aud":"sentinel","exp":exp}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(
            authenticate(
                &headers(&[("authorization", &format!("Bearer {hs512}"))]),
                &snap,
                0
            )
            .await
            .is_err()
        );
    }

    fn base64_url(s: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }
}
