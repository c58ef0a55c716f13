//! The credential format shared by API keys and proxy join tokens, and how
//! they are hashed and checked.
//!
//! A key reads `sntl_<id>_<secret><check>`:
//! - `sntl_` names the kind (`sntj_` for join tokens), so a leaked key is
//!   recognisable by secret scanners;
//! - `<id>` (12 base62 characters) is public: it names the key in the admin
//!   API and the audit log, and lets a proxy find the stored hash without
//!   comparing secrets;
//! - `<secret>` (32 base62 characters, about 190 bits) is the high-entropy part;
//! - `<check>` (6 base62 characters) is a CRC-32 of everything before it, so
//!   a typo or truncation is refused before any lookup.
//!
//! Only SHA-256 of the whole key is stored. A fast hash is right here: the
//! secret is random with ~190 bits of entropy, so there is nothing for a slow
//! password hash to protect, and the proxy checks a key on every request.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const ID_LEN: usize = 12;
const SECRET_LEN: usize = 32;
const CHECK_LEN: usize = 6;

/// What a credential is for; decides its type prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// An agent's API key.
    Api,
    /// A proxy's join token toward the control plane.
    Join,
}

impl KeyKind {
    /// The type prefix, including the trailing underscore.
    pub fn prefix(self) -> &'static str {
        match self {
            KeyKind::Api => "sntl_",
            KeyKind::Join => "sntj_",
        }
    }
}

/// A freshly generated credential. `secret` is the only copy of the full key
/// text; show it once and drop it.
#[derive(Clone)]
pub struct GeneratedKey {
    pub id: String,
    pub secret: String,
    pub hash: [u8; 32],
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret, even in debug output.
        f.debug_struct("GeneratedKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why a presented credential was refused before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("credential has the wrong type prefix")]
    WrongPrefix,
    #[error("credential has the wrong length or characters")]
    Malformed,
    #[error("credential checksum does not match")]
    BadChecksum,
}

/// Generates a new credential of `kind`.
pub fn generate(kind: KeyKind) -> GeneratedKey {
    let id = random_base62(ID_LEN);
    let secret_part = random_base62(SECRET_LEN);
    let mut text = String::with_capacity(kind.prefix().len() + ID_LEN + 1 + SECRET_LEN + CHECK_LEN);
    text.push_str(kind.prefix());
    text.push_str(&id);
    text.push('_');
    text.push_str(&secret_part);
    let check = checksum(&text);
    text.push_str(&check);
    let hash = hash_key(&text);
    GeneratedKey {
        id,
        secret: text,
        hash,
    }
}

/// The public display prefix of key `id`, e.g. `sntl_0a1B2c3D4e5F`.
pub fn display_prefix(kind: KeyKind, id: &str) -> String {
    format!("{}{}", kind.prefix(), id)
}

/// SHA-256 of the full key text: what is stored and pushed to proxies.
pub fn hash_key(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Checks the shape and checksum of `text` and returns its public id.
/// This never touches stored data, so it is safe to run before a lookup.
pub fn parse(kind: KeyKind, text: &str) -> Result<&str, KeyFormatError> {
    let rest = text
        .strip_prefix(kind.prefix())
        .ok_or(KeyFormatError::WrongPrefix)?;
    if rest.len() != ID_LEN + 1 + SECRET_LEN + CHECK_LEN || !rest.is_ascii() {
        return Err(KeyFormatError::Malformed);
    }
    let (id, tail) = rest.split_at(ID_LEN);
    let tail = tail.strip_prefix('_').ok_or(KeyFormatError::Malformed)?;
    if !id
        .bytes()
        .chain(tail.bytes())
        .all(|b| b.is_ascii_alphanumeric())
    {
        return Err(KeyFormatError::Malformed);
    }
    let body_len = text.len() - CHECK_LEN;
    let (body, check) = text.split_at(body_len);
    // The checksum is not a secret; an ordinary comparison is fine.
    if checksum(body) != check {
        return Err(KeyFormatError::BadChecksum);
    }
    Ok(id)
}

/// Compares the hash of the presented key with a stored hash in constant time.
pub fn verify_hash(text: &str, stored: &[u8]) -> bool {
    let presented = hash_key(text);
    stored.len() == presented.len() && bool::from(presented.as_slice().ct_eq(stored))
}

/// Constant-time equality of two secrets of any length. The length itself is
/// not secret for the tokens compared here (their format is public).
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn checksum(body: &str) -> String {
    let mut n = crc32fast::hash(body.as_bytes()) as u64;
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    // Every byte comes from ALPHABET, so this is valid UTF-8.
    out.iter().map(|&b| b as char).collect()
}

fn random_base62(len: usize) -> String {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        rand::fill(&mut buf[..]);
        for &b in &buf {
            // 248 = 4 * 62: rejecting the top 8 values keeps the draw uniform.
            if b < 248 && out.len() < len {
                out.push(ALPHABET[(b % 62) as usize] as char);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_verify() {
        let key = generate(KeyKind::Api);
        assert!(key.secret.starts_with("sntl_"));
        assert_eq!(parse(KeyKind::Api, &key.secret), Ok(key.id.as_str()));
        assert!(verify_hash(&key.secret, &key.hash));
        assert!(!verify_hash(&key.secret, &[0u8; 32]));
        assert!(!verify_hash(&key.secret, &key.hash[..31]));
    }

    #[test]
    fn kinds_do_not_mix() {
        let key = generate(KeyKind::Join);
        assert_eq!(
            parse(KeyKind::Api, &key.secret),
            Err(KeyFormatError::WrongPrefix)
        );
        assert!(parse(KeyKind::Join, &key.secret).is_ok());
    }

    #[test]
    fn typos_and_truncation_are_refused() {
        let key = generate(KeyKind::Api);
        let mut chars: Vec<char> = key.secret.chars().collect();
        let i = 20;
        chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
        let typo: String = chars.into_iter().collect();
        assert_eq!(parse(KeyKind::Api, &typo), Err(KeyFormatError::BadChecksum));
        assert_eq!(
            parse(KeyKind::Api, &key.secret[..key.secret.len() - 1]),
            Err(KeyFormatError::Malformed)
        );
        assert_eq!(parse(KeyKind::Api, ""), Err(KeyFormatError::WrongPrefix));
        assert_eq!(
            parse(KeyKind::Api, "sntl_ééééééééééééééééééééééééééééé"),
            Err(KeyFormatError::Malformed)
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = generate(KeyKind::Api);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.secret));
    }

    #[test]
    fn secrets_equal_handles_lengths() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"abcd"));
    }
}
