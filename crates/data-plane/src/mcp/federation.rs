//! Several upstreams as one virtual server.
//!
//! Lists (`tools/list`, `prompts/list`, `resources/list`,
//! `resources/templates/list`) are the union of the upstreams' lists. Tool
//! and prompt names get a `<backend><separator>` prefix, always or only where
//! two backends offer the same name (policy `federation.prefix_mode`), and
//! tools the caller may not call are left out. Calls are routed back by the
//! prefix, or for unprefixed names by which backend offered the name (a
//! per-proxy cache refilled from any list, so any replica rebuilds it).

use std::collections::HashMap;
use std::sync::RwLock;

use sentinel_shared::spec::PrefixMode;
use serde_json::Value;

use crate::gate::authn::Principal;
use crate::gate::authz::may_see;
use crate::policy::Snapshot;
use crate::policy::watch::Backend;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListKind {
    Tools,
    Prompts,
    Resources,
    ResourceTemplates,
}

impl ListKind {
    pub fn from_method(m: &str) -> Option<Self> {
        Some(match m {
            "tools/list" => ListKind::Tools,
            "prompts/list" => ListKind::Prompts,
            "resources/list" => ListKind::Resources,
            "resources/templates/list" => ListKind::ResourceTemplates,
            _ => return None,
        })
    }
    pub fn method(self) -> &'static str {
        match self {
            ListKind::Tools => "tools/list",
            ListKind::Prompts => "prompts/list",
            ListKind::Resources => "resources/list",
            ListKind::ResourceTemplates => "resources/templates/list",
        }
    }
    /// The result field holding the items.
    pub fn field(self) -> &'static str {
        match self {
            ListKind::Tools => "tools",
            ListKind::Prompts => "prompts",
            ListKind::Resources => "resources",
            ListKind::ResourceTemplates => "resourceTemplates",
        }
    }
    /// The item field that names (or addresses) an item.
    pub fn key(self) -> &'static str {
        match self {
            ListKind::Tools | ListKind::Prompts => "name",
            ListKind::Resources => "uri",
            ListKind::ResourceTemplates => "uriTemplate",
        }
    }
    /// Whether names are prefixed (URIs never are: they are addresses).
    fn renamed(self) -> bool {
        matches!(self, ListKind::Tools | ListKind::Prompts)
    }
}

/// Which backends offered which names, learned from lists.
#[derive(Default)]
pub struct Owners {
    map: RwLock<HashMap<(ListKind, String), Vec<String>>>,
}

impl Owners {
    pub fn lookup(&self, kind: ListKind, name: &str) -> Vec<String> {
        let map = match self.map.read() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.get(&(kind, name.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    fn record(&self, kind: ListKind, lists: &[(String, Vec<Value>)]) {
        let mut fresh: HashMap<(ListKind, String), Vec<String>> = HashMap::new();
        for (backend, items) in lists {
            for it in items {
                if let Some(n) = it.get(kind.key()).and_then(Value::as_str) {
                    fresh
                        .entry((kind, n.to_string()))
                        .or_default()
                        .push(backend.clone());
                }
            }
        }
        let mut map = match self.map.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if map.len() > 100_000 {
            map.clear();
        }
        map.extend(fresh);
    }
}

/// Merges per-backend lists into what this principal sees.
pub fn merge(
    snap: &Snapshot,
    principal: &Principal,
    owners: &Owners,
    kind: ListKind,
    lists: Vec<(String, Vec<Value>)>,
) -> Vec<Value> {
    owners.record(kind, &lists);
    let sep = &snap.federation.separator;
    let mut counts: HashMap<String, usize> = HashMap::new();
    if kind.renamed() && snap.federation.prefix_mode == PrefixMode::OnCollision {
        for (_, items) in &lists {
            for it in items {
                if let Some(n) = it.get(kind.key()).and_then(Value::as_str) {
                    *counts.entry(n.to_string()).or_default() += 1;
                }
            }
        }
    }
    let mut out = Vec::new();
    for (backend, items) in lists {
        for mut it in items {
            let Some(name) = it
                .get(kind.key())
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                continue;
            };
            if kind == ListKind::Tools && !may_see(principal, snap, &backend, &name) {
                continue;
            }
            if kind.renamed() {
                let prefix = match snap.federation.prefix_mode {
                    PrefixMode::Always => true,
                    PrefixMode::OnCollision => counts.get(&name).copied().unwrap_or(0) > 1,
                };
                if prefix {
                    it[kind.key()] = Value::String(format!("{backend}{sep}{name}"));
                }
            }
            out.push(it);
        }
    }
    out
}

/// Finds the backend and upstream name behind a name the client used.
pub fn resolve<'a>(
    snap: &'a Snapshot,
    owners: &Owners,
    kind: ListKind,
    shown: &str,
) -> Option<(&'a Backend, String)> {
    let sep = &snap.federation.separator;
    for b in &snap.backends {
        if let Some(rest) = shown
            .strip_prefix(b.name.as_str())
            .and_then(|r| r.strip_prefix(sep.as_str()))
            && !rest.is_empty()
        {
            return Some((b, rest.to_string()));
        }
    }
    if snap.federation.prefix_mode == PrefixMode::Always && kind.renamed() {
        return None;
    }
    let owners_of = owners.lookup(kind, shown);
    let mut found = owners_of
        .iter()
        .filter_map(|name| snap.backend(name))
        .collect::<Vec<_>>();
    if found.is_empty() && snap.backends.len() == 1 {
        found.push(&snap.backends[0]);
    }
    match found.as_slice() {
        [one] => Some((one, shown.to_string())),
        _ => None,
    }
}
