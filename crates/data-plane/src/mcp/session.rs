//! Sealed legacy session ids.
//!
//! The `Mcp-Session-Id` a client receives is the session state itself,
//! sealed with XChaCha20-Poly1305 under the newest session key of the policy:
//! the upstream session ids, the negotiated versions and the principal the
//! session is bound to. Any replica holding the key opens it, so no replica
//! keeps session state; older keys still open tokens during a rotation.
//!
//! Format: `s1.<key id>.<base64url(nonce || ciphertext)>`; the key id and
//! the version prefix are authenticated as associated data.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use sentinel_shared::proto::SessionKey;

const PREFIX: &str = "s1";
/// Longest session id accepted before any decoding work.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// What a legacy session carries between requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// [`crate::gate::authn::Principal::binding`] of the session's owner.
    #[serde(rename = "b")]
    pub binding: String,
    /// Protocol version agreed with the client.
    #[serde(rename = "v")]
    pub protocol_version: String,
    /// Client name from `initialize`, for audit.
    #[serde(rename = "c", default)]
    pub client_name: String,
    /// One entry per upstream reached at `initialize`.
    #[serde(rename = "u")]
    pub upstreams: Vec<UpstreamSession>,
    /// Unix microseconds at creation.
    #[serde(rename = "t")]
    pub created_us: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamSession {
    /// Backend name.
    #[serde(rename = "n")]
    pub backend: String,
    /// The upstream's `Mcp-Session-Id`, if it gave one.
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Protocol version the upstream agreed to.
    #[serde(rename = "v")]
    pub protocol_version: String,
}

impl SessionState {
    pub fn upstream(&self, backend: &str) -> Option<&UpstreamSession> {
        self.upstreams.iter().find(|u| u.backend == backend)
    }
}

/// Why a token did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("malformed session id")]
    Malformed,
    #[error("session key {0} is not held")]
    UnknownKey(u32),
    #[error("session id fails authentication")]
    Forged,
}

/// The session keys of one policy version.
pub struct SessionSealer {
    newest: (u32, XChaCha20Poly1305),
    all: Vec<(u32, XChaCha20Poly1305)>,
    /// Tokens this sealer has opened, by their exact text: a session sends
    /// the same token with every request, and opening it (decrypt, JSON)
    /// cost ~5% of a tools/call. Only a token that authenticated is ever
    /// put here; a new policy version builds a new sealer, so a removed key
    /// takes its sessions with it. Bounded: emptied when full.
    opened: Mutex<HashMap<String, SessionState>>,
}

/// Opened tokens kept per sealer at most.
const OPENED_CAP: usize = 4096;

impl SessionSealer {
    /// `Ok(None)` when the policy holds no session key.
    pub fn new(keys: &[SessionKey]) -> Result<Option<Self>, String> {
        let mut all = Vec::with_capacity(keys.len());
        for k in keys {
            let c = XChaCha20Poly1305::new_from_slice(&k.key)
                .map_err(|_| format!("key {} must be 32 bytes", k.id))?;
            all.push((k.id, c));
        }
        let Some(newest) = all.iter().max_by_key(|(id, _)| *id).cloned() else {
            return Ok(None);
        };
        Ok(Some(Self {
            newest,
            all,
            opened: Mutex::new(HashMap::new()),
        }))
    }

    pub fn seal(&self, state: &SessionState) -> Result<String, String> {
        let plain = serde_json::to_vec(state).map_err(|e| e.to_string())?;
        let (kid, cipher) = &self.newest;
        let aad = format!("{PREFIX}.{kid}");
        let mut nonce_bytes = [0u8; 24];
        rand::fill(&mut nonce_bytes[..]);
        let nonce = XNonce::from(nonce_bytes);
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &plain,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| "seal failed".to_string())?;
        let mut raw = Vec::with_capacity(24 + ct.len());
        raw.extend_from_slice(&nonce_bytes);
        raw.extend_from_slice(&ct);
        Ok(format!("{aad}.{}", URL_SAFE_NO_PAD.encode(raw)))
    }

    pub fn open(&self, token: &str) -> Result<SessionState, OpenError> {
        if let Some(s) = self.cached().get(token) {
            return Ok(s.clone());
        }
        let state = self.open_sealed(token)?;
        let mut cache = self.cached();
        if cache.len() >= OPENED_CAP {
            cache.clear();
        }
        cache.insert(token.to_string(), state.clone());
        Ok(state)
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionState>> {
        self.opened.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_sealed(&self, token: &str) -> Result<SessionState, OpenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(OpenError::Malformed);
        }
        let mut parts = token.splitn(3, '.');
        let (Some(PREFIX), Some(kid), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(OpenError::Malformed);
        };
        let kid: u32 = kid.parse().map_err(|_| OpenError::Malformed)?;
        let cipher = self
            .all
            .iter()
            .find(|(id, _)| *id == kid)
            .map(|(_, c)| c)
            .ok_or(OpenError::UnknownKey(kid))?;
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| OpenError::Malformed)?;
        if raw.len() < 24 + 16 {
            return Err(OpenError::Malformed);
        }
        let (nonce, ct) = raw.split_at(24);
        let nonce = XNonce::try_from(nonce).map_err(|_| OpenError::Malformed)?;
        let aad = format!("{PREFIX}.{kid}");
        let plain = cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| OpenError::Forged)?;
        serde_json::from_slice(&plain).map_err(|_| OpenError::Malformed)
    }
}

/// A short, stable, non-secret name for a session, for the audit log (the
/// token itself is a bearer of upstream sessions and is never logged).
pub fn audit_id(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    hex::encode(&d[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u32, b: u8) -> SessionKey {
        SessionKey {
            id,
            key: vec![b; 32],
        }
    }

    fn state() -> SessionState {
        SessionState {
            binding: "key:abc".into(),
            protocol_version: "2025-06-18".into(),
            client_name: "t".into(),
            upstreams: vec![UpstreamSession {
                backend: "everything".into(),
                session_id: Some("u-1".into()),
                protocol_version: "2025-06-18".into(),
            }],
            created_us: 5,
        }
    }

    #[test]
    fn round_trip_and_rotation() {
        let old = SessionSealer::new(&[key(1, 1)]).unwrap().unwrap();
        let t1 = old.seal(&state()).unwrap();
        assert!(t1.starts_with("s1.1."));
        assert_eq!(old.open(&t1).unwrap(), state());
        // After rotation the newest key seals and the old one still opens.
        let rotated = SessionSealer::new(&[key(1, 1), key(2, 2)])
            .unwrap()
            .unwrap();
        let t2 = rotated.seal(&state()).unwrap();
        assert!(t2.starts_with("s1.2."));
        assert_eq!(rotated.open(&t1).unwrap(), state());
        assert_eq!(old.open(&t2), Err(OpenError::UnknownKey(2)));
    }

    #[test]
    fn opened_tokens_are_bounded() {
        let s = SessionSealer::new(&[key(1, 1)]).unwrap().unwrap();
        let tokens: Vec<String> = (0..OPENED_CAP + 10)
            .map(|_| s.seal(&state()).unwrap())
            .collect();
        for t in &tokens {
            assert_eq!(s.open(t).unwrap(), state());
        }
        assert!(s.cached().len() <= OPENED_CAP);
        // Emptied when full, the earliest still open (the slow way).
        assert_eq!(s.open(&tokens[0]).unwrap(), state());
    }

    #[test]
    fn tampering_is_detected() {
        let s = SessionSealer::new(&[key(1, 1), key(2, 2)])
            .unwrap()
            .unwrap();
        let t = s.seal(&state()).unwrap();
        // Opened once, the token is kept: tampered copies of it still fail.
        assert_eq!(s.open(&t).unwrap(), state());
        assert_eq!(s.open(&t).unwrap(), state());
        // Claiming another key id breaks the associated data.
        let relabelled = t.replacen("s1.2.", "s1.1.", 1);
        assert_eq!(s.open(&relabelled), Err(OpenError::Forged));
        let mut bytes = t.into_bytes();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(bytes).unwrap();
        assert!(s.open(&flipped).is_err());
        for junk in ["", "s1", "s1.x.y", "s2.1.AAAA", "s1.1.!!!!"] {
            assert!(s.open(junk).is_err(), "{junk}");
        }
        assert!(SessionSealer::new(&[]).unwrap().is_none());
        assert!(
            SessionSealer::new(&[SessionKey {
                id: 1,
                key: vec![0; 3]
            }])
            .is_err()
        );
    }
}
