//! Edge checks made before anything else: `Origin` (403) and `Host` (421),
//! the DNS-rebinding defence. A proxy in front of an upstream otherwise
//! disables the upstream's own check, since the upstream only ever sees the
//! proxy.

use http::HeaderMap;

use crate::config::Config;

pub struct EdgeRules {
    origins: Vec<String>,
    allow_loopback_origins: bool,
    hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeRefusal {
    /// 403.
    Origin(String),
    /// 421 Misdirected Request.
    Host(String),
}

const LOOPBACK: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

impl EdgeRules {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            origins: cfg.allowed_origins.clone(),
            allow_loopback_origins: cfg.allow_loopback_origins,
            hosts: if cfg.allowed_hosts.is_empty() {
                LOOPBACK.iter().map(|s| s.to_string()).collect()
            } else {
                cfg.allowed_hosts
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect()
            },
        }
    }

    pub fn check(&self, headers: &HeaderMap) -> Result<(), EdgeRefusal> {
        if let Some(origin) = headers.get(http::header::ORIGIN) {
            let o = origin.to_str().unwrap_or("").to_ascii_lowercase();
            let ok = self
                .origins
                .iter()
                .any(|a| a == "*" || a.eq_ignore_ascii_case(&o))
                || (self.allow_loopback_origins && is_loopback_origin(&o));
            if !ok {
                return Err(EdgeRefusal::Origin(o));
            }
        }
        let host = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let name = host_name(&host);
        if !self.hosts.iter().any(|h| h == "*" || *h == name) {
            return Err(EdgeRefusal::Host(host));
        }
        Ok(())
    }
}

fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    host.split(':').next().unwrap_or(host)
}

fn is_loopback_origin(o: &str) -> bool {
    let rest = o
        .strip_prefix("http://")
        .or_else(|| o.strip_prefix("https://"))
        .unwrap_or("");
    LOOPBACK.contains(&host_name(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn origin_and_host_table() {
        let cfg = Config {
            allowed_origins: vec!["https://app.example.com".into()],
            ..Default::default()
        };
        let rules = EdgeRules::from_config(&cfg);
        let ok = [
            h(&[("host", "127.0.0.1:8080")]),
            h(&[("host", "localhost")]),
            h(&[("host", "[::1]:9"), ("origin", "http://localhost:3000")]),
            h(&[
                ("host", "127.0.0.1:1"),
                ("origin", "https://app.example.com"),
            ]),
        ];
        for m in ok {
            assert_eq!(rules.check(&m), Ok(()), "{m:?}");
        }
        assert!(matches!(
            rules.check(&h(&[
                ("host", "127.0.0.1"),
                ("origin", "https://evil.example")
            ])),
            Err(EdgeRefusal::Origin(_))
        ));
        assert!(matches!(
            rules.check(&h(&[("host", "evil.example:80")])),
            Err(EdgeRefusal::Host(_))
        ));
        assert!(matches!(rules.check(&h(&[])), Err(EdgeRefusal::Host(_))));
    }
}
