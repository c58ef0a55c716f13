//! A policy snapshot written by hand: the declarative policy plus the API key
//! hashes and session keys that the control plane would otherwise push.
//! JSON or TOML; used by tests and by proxies that run without a control
//! plane.

use std::path::Path;

use serde::{Deserialize, Serialize};

use sentinel_shared::proto::{self, PolicySnapshot};
use sentinel_shared::spec::PolicySpec;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyFile {
    pub version: u64,
    pub policy: PolicySpec,
    pub api_keys: Vec<ApiKeyEntry>,
    pub session_keys: Vec<SessionKeyEntry>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKeyEntry {
    /// Key id; taken from `key` when that is given.
    pub id: String,
    /// Hex SHA-256 of the key text ...
    pub hash: String,
    /// ... or the key text itself (test fixtures only).
    pub key: String,
    pub role: String,
    pub owner: String,
    pub expires_at_us: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionKeyEntry {
    pub id: u32,
    /// 32 bytes, hex.
    pub key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{field}: {message}")]
    Field { field: String, message: String },
}

impl PolicyFile {
    pub fn read(path: &Path) -> Result<PolicySnapshot, PolicyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let parsed: PolicyFile = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).map_err(|e| PolicyFileError::Parse {
                path: path.display().to_string(),
                message: e.to_string(),
            })?
        } else {
            serde_json::from_str(&text).map_err(|e| PolicyFileError::Parse {
                path: path.display().to_string(),
                message: e.to_string(),
            })?
        };
        parsed.into_snapshot()
    }

    pub fn into_snapshot(self) -> Result<PolicySnapshot, PolicyFileError> {
        let spec = proto::PolicySpec::from(&self.policy);
        let mut api_keys = Vec::with_capacity(self.api_keys.len());
        for (i, k) in self.api_keys.into_iter().enumerate() {
            let (id, hash) = if !k.key.is_empty() {
                let id = sentinel_shared::keys::parse(sentinel_shared::keys::KeyKind::Api, &k.key)
                    .map_err(|e| PolicyFileError::Field {
                        field: format!("api_keys[{i}].key"),
                        message: e.to_string(),
                    })?
                    .to_string();
                (id, sentinel_shared::keys::hash_key(&k.key).to_vec())
            } else {
                let hash = hex::decode(&k.hash).map_err(|e| PolicyFileError::Field {
                    field: format!("api_keys[{i}].hash"),
                    message: e.to_string(),
                })?;
                (k.id, hash)
            };
            api_keys.push(proto::ApiKeyRecord {
                id,
                hash,
                role: k.role,
                owner: k.owner,
                expires_at_us: k.expires_at_us,
            });
        }
        let mut session_keys = Vec::with_capacity(self.session_keys.len());
        for (i, s) in self.session_keys.into_iter().enumerate() {
            let key = hex::decode(&s.key).map_err(|e| PolicyFileError::Field {
                field: format!("session_keys[{i}].key"),
                message: e.to_string(),
            })?;
            session_keys.push(proto::SessionKey { id: s.id, key });
        }
        Ok(PolicySnapshot {
            version: self.version,
            created_at_us: sentinel_shared::now_us(),
            roles: spec.roles,
            api_keys,
            backends: spec.backends,
            jwt_issuers: spec.jwt_issuers,
            redaction_rules: spec.redaction_rules,
            audit: spec.audit,
            federation: spec.federation,
            session_keys,
        })
    }
}
