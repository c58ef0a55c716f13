//! Extractors whose failures answer in the API's JSON error shape and name
//! the body field, path segment or query parameter at fault.
//!
//! axum's own extractors reject with plain text; an admin tool or a script
//! reading our errors should never have to parse two shapes.

use std::collections::HashSet;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use http::header::CONTENT_TYPE;
use http::request::Parts;
use sentinel_shared::spec::ValidationErrors;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::{Error, Result};
use crate::store::to_us;

/// A JSON request body. Unlike `axum::Json`, a missing `Content-Type` is
/// accepted (curl users forget it), and every failure is a 400 naming the
/// field, e.g. `roles[0].allow[1]: invalid type: integer, expected a string`.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self> {
        let bytes = json_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(Error::invalid("body", "a JSON document is required"));
        }
        parse_json(&bytes).map(ApiJson)
    }
}

/// Like [`ApiJson`], but an empty body stands for `T::default()`: for calls
/// whose every field is optional (`POST /keys/{id}/rotate`).
pub struct OptionalJson<T>(pub T);

impl<T, S> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self> {
        let bytes = json_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        parse_json(&bytes).map(OptionalJson)
    }
}

async fn json_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes> {
    if let Some(ct) = req.headers().get(CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or_default().trim();
        if !(essence == "application/json" || essence.ends_with("+json")) {
            return Err(Error::invalid("content-type", "must be application/json"));
        }
    }
    Bytes::from_request(req, state).await.map_err(bytes_error)
}

fn bytes_error(r: BytesRejection) -> Error {
    // The only way reading a body fails before parsing is the size limit
    // (axum's default: 2 MiB) or a broken connection.
    Error::invalid("body", r.body_text().to_lowercase())
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let value = match axum::Json::<T>::from_bytes(bytes) {
        Ok(axum::Json(v)) => v,
        Err(rejection) => return Err(json_error(&rejection)),
    };
    // JSON may spell a NUL character (`\u0000`); Postgres text cannot hold
    // one, and would answer with an error we could only call internal.
    // Raw NUL bytes are not valid JSON, so only the escape needs looking for.
    if bytes.windows(6).any(|w| w == b"\\u0000") {
        let doc: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid("body", format!("is not valid JSON: {e}")))?;
        if let Some(path) = find_nul(&doc, String::new()) {
            return Err(Error::invalid(path, NUL_MESSAGE));
        }
    }
    Ok(value)
}

const NUL_MESSAGE: &str = "must not contain NUL characters";

/// The path (`roles[0].allow[1]`) of the first string or key holding a NUL.
fn find_nul(v: &serde_json::Value, path: String) -> Option<String> {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match v {
        serde_json::Value::String(s) if s.contains('\0') => {
            Some(if path.is_empty() { "body".into() } else { path })
        }
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_nul(item, format!("{path}[{i}]"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(k, item)| {
            if k.contains('\0') {
                Some(join(&k.replace('\0', "\\0")))
            } else {
                find_nul(item, join(k))
            }
        }),
        _ => None,
    }
}

/// Turns axum's rejection into a field error. The detail of a data error
/// reads `path: message` (axum tracks the path with serde_path_to_error);
/// the path becomes the field.
fn json_error(r: &JsonRejection) -> Error {
    let detail = std::error::Error::source(r)
        .map(ToString::to_string)
        .unwrap_or_else(|| r.body_text());
    match r {
        JsonRejection::JsonDataError(_) => match split_path(&detail) {
            Some((path, message)) => Error::invalid(path, message),
            None => Error::invalid("body", detail),
        },
        JsonRejection::JsonSyntaxError(_) => {
            Error::invalid("body", format!("is not valid JSON: {detail}"))
        }
        _ => Error::invalid("body", r.body_text().to_lowercase()),
    }
}

/// `roles[0].allow[1]: invalid type` -> (`roles[0].allow[1]`, `invalid type`).
fn split_path(detail: &str) -> Option<(&str, &str)> {
    let (path, message) = detail.split_once(": ")?;
    let looks_like_path = !path.is_empty()
        && path != "."
        && !path.contains(char::is_whitespace)
        && !path.contains('`');
    looks_like_path.then_some((path, message))
}

/// One path segment (`/keys/{id}`), with a JSON error when it does not
/// decode (invalid percent-encoding or UTF-8).
pub struct PathName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathName {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(name)) if name.contains('\0') => {
                Err(Error::invalid("path", NUL_MESSAGE))
            }
            Ok(axum::extract::Path(name)) => Ok(PathName(name)),
            Err(e) => Err(Error::invalid("path", e.body_text().to_lowercase())),
        }
    }
}

/// The query string, read parameter by parameter. Each getter records a
/// field error naming the parameter instead of failing at once, so a
/// request with three bad parameters hears about all three; [`Params::finish`]
/// reports them, and any parameter the endpoint does not know (a typo such
/// as `form=` for `from=` must not silently widen a query).
#[derive(Debug)]
pub struct Params {
    pairs: Vec<(String, String)>,
    errors: ValidationErrors,
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self> {
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|e| Error::invalid("query", e.body_text().to_lowercase()))?;
        Ok(Params {
            pairs,
            errors: ValidationErrors::default(),
        })
    }
}

impl Params {
    #[cfg(test)]
    pub fn parse(query: &str) -> Params {
        let uri: http::Uri = format!("/?{query}").parse().unwrap_or_default();
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&uri).unwrap_or_default();
        Params {
            pairs,
            errors: ValidationErrors::default(),
        }
    }

    /// Removes `name` and returns its value; an empty value counts as
    /// absent (what an HTML form sends for an empty field).
    fn take(&mut self, name: &str) -> Option<String> {
        let mut found: Vec<String> = Vec::new();
        self.pairs.retain(|(k, v)| {
            if k == name {
                found.push(v.clone());
                false
            } else {
                true
            }
        });
        if found.len() > 1 {
            self.errors.push(name, "is given more than once");
            return None;
        }
        if found.iter().any(|v| v.contains('\0')) {
            self.errors.push(name, NUL_MESSAGE);
            return None;
        }
        found.pop().filter(|v| !v.is_empty())
    }

    pub fn string(&mut self, name: &str) -> Option<String> {
        self.take(name)
    }

    pub fn bool(&mut self, name: &str) -> Option<bool> {
        let v = self.take(name)?;
        match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" => Some(false),
            _ => {
                self.errors.push(name, "must be true or false");
                None
            }
        }
    }

    pub fn u32(&mut self, name: &str) -> Option<u32> {
        let v = self.take(name)?;
        match v.parse() {
            Ok(n) => Some(n),
            Err(_) => {
                self.errors.push(name, "must be a non-negative integer");
                None
            }
        }
    }

    /// An RFC 3339 timestamp, as unix microseconds.
    pub fn time_us(&mut self, name: &str) -> Option<i64> {
        let v = self.take(name)?;
        match OffsetDateTime::parse(&v, &Rfc3339) {
            Ok(t) => Some(to_us(t)),
            Err(_) => {
                self.errors.push(
                    name,
                    "must be an RFC 3339 timestamp such as 2026-11-23T12:00:00Z",
                );
                None
            }
        }
    }

    /// One of `allowed`.
    pub fn choice(&mut self, name: &str, allowed: &[&'static str]) -> Option<&'static str> {
        let v = self.take(name)?;
        match allowed.iter().find(|a| **a == v) {
            Some(a) => Some(*a),
            None => {
                self.errors
                    .push(name, format!("must be one of {}", allowed.join(", ")));
                None
            }
        }
    }

    /// Records a problem found by the caller with a parameter it read.
    pub fn reject(&mut self, name: &str, message: impl Into<String>) {
        self.errors.push(name, message);
    }

    /// Fails with every problem found, including parameters left unread.
    pub fn finish(self) -> Result<()> {
        let Params { pairs, mut errors } = self;
        let mut unknown = HashSet::new();
        for (k, _) in pairs {
            if unknown.insert(k.clone()) {
                errors.push(k, "is not a parameter of this endpoint");
            }
        }
        errors.into_result().map_err(Error::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Doc {
            roles: Vec<Inner>,
        }
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Inner {
            allow: Vec<String>,
        }
        let err = parse_json::<Doc>(br#"{"roles":[{"allow":["a",1]}]}"#).unwrap_err();
        assert_eq!(err.fields()[0].field, "roles[0].allow[1]", "{err}");
        let err = parse_json::<Doc>(b"{\"roles\":").unwrap_err();
        assert_eq!(err.fields()[0].field, "body", "{err}");
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }

    #[test]
    fn nul_characters_are_refused_by_path() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Doc {
            owner: String,
            tags: Vec<String>,
        }
        let err = parse_json::<Doc>(br#"{"owner":"a","tags":["x","b\u0000"]}"#).unwrap_err();
        assert_eq!(err.fields()[0].field, "tags[1]", "{err}");
        // An escaped backslash followed by "u0000" is no NUL.
        parse_json::<Doc>(br#"{"owner":"\\u0000","tags":[]}"#).unwrap();
        let mut p = Params::parse("owner=a%00b");
        assert_eq!(p.string("owner"), None);
        assert_eq!(p.finish().unwrap_err().fields()[0].field, "owner");
    }

    #[test]
    fn params_report_bad_duplicate_and_unknown_names() {
        let mut p = Params::parse("limit=x&from=yesterday&form=1&a=1&a=2&tool=");
        assert_eq!(p.u32("limit"), None);
        assert_eq!(p.time_us("from"), None);
        assert_eq!(p.string("a"), None);
        assert_eq!(p.string("tool"), None);
        let err = p.finish().unwrap_err();
        let fields: Vec<&str> = err.fields().iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, vec!["limit", "from", "a", "form"]);
        let mut p = Params::parse("from=2026-11-23T12:00:00Z&chain_broken_only=true");
        assert_eq!(p.time_us("from"), Some(1_795_435_200_000_000));
        assert_eq!(p.bool("chain_broken_only"), Some(true));
        p.finish().unwrap();
    }
}
