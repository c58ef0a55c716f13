//! Fixtures for unit tests.

use sentinel_shared::keys::{self, KeyKind};
use sentinel_shared::spec::{JwtIssuerSpec, PolicySpec, RateLimitSpec, RoleSpec};

use crate::config::Config;
use crate::policy::Snapshot;
use crate::policy::file::{ApiKeyEntry, PolicyFile, SessionKeyEntry};
use crate::policy::policy_channel;

/// A snapshot with roles `reader` and `limited`, an HS256 issuer `idp`
/// using `hmac`, and three keys: [valid reader, reader expiring at 1000 us,
/// limited (2 burst, 1/s)].
pub fn snapshot_with(hmac: &str) -> (std::sync::Arc<Snapshot>, Vec<String>) {
    let k: Vec<_> = (0..3).map(|_| keys::generate(KeyKind::Api)).collect();
    let file = PolicyFile {
        version: 1,
        policy: PolicySpec {
            roles: vec![
                RoleSpec {
                    name: "reader".into(),
                    allow: vec!["*/echo".into()],
                    ..Default::default()
                },
                RoleSpec {
                    name: "limited".into(),
                    allow: vec!["*".into()],
                    rate_limits: vec![RateLimitSpec {
                        per_second: 1.0,
                        burst: 2,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
            jwt_issuers: vec![JwtIssuerSpec {
                name: "idp".into(),
                issuer: "https://idp.test".into(),
                audiences: vec!["sentinel".into()],
                algorithms: vec!["HS256".into()],
                hmac_secret: hmac.into(),
                ..Default::default()
            }],
            ..Default::default()
        },
        api_keys: vec![
            ApiKeyEntry {
                key: k[0].secret.clone(),
                role: "reader".into(),
                owner: "alice".into(),
                ..Default::default()
            },
            ApiKeyEntry {
                key: k[1].secret.clone(),
                role: "reader".into(),
                expires_at_us: 1000,
                ..Default::default()
            },
            ApiKeyEntry {
                key: k[2].secret.clone(),
                role: "limited".into(),
                ..Default::default()
            },
        ],
        session_keys: vec![SessionKeyEntry {
            id: 1,
            key: hex::encode([7u8; 32]),
        }],
    };
    let cfg = Config {
        proxy_id: "t".into(),
        ..Default::default()
    };
    let (publisher, reader) = policy_channel(&cfg);
    publisher.publish(file.into_snapshot().unwrap()).unwrap();
    (
        reader.current().unwrap(),
        k.into_iter().map(|k| k.secret).collect(),
    )
}
