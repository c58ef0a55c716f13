//! The REST API end to end: `router(state)` driven with `oneshot` against a
//! fresh, migrated Postgres database per test.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use futures::StreamExt;
use http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::router;
use crate::config::Config;
use crate::state::AppState;
use crate::store::audit::tests::chain;
use crate::testing::TestDb;

const TOKEN: &str = "test-admin-token-0123456789";

struct Api {
    db: TestDb,
    app: Router,
}

async fn api() -> Api {
    let db = TestDb::new().await;
    let config = Config {
        database_url: db.url.clone(),
        admin_tokens: vec![TOKEN.into()],
        ..Default::default()
    };
    let state = AppState {
        store: db.store.clone(),
        config: Arc::new(config),
        metrics: None,
    };
    Api {
        app: router(state),
        db,
    }
}

/// A response read whole: status, headers, body text.
struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The `field` of the first field error.
    fn field(&self) -> String {
        self.json()["error"]["fields"][0]["field"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Api {
    async fn send(&self, req: Request<Body>) -> Reply {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        Reply {
            status,
            headers,
            text: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }

    /// An authenticated call with an optional JSON body.
    async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {TOKEN}"));
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        self.send(req.body(body).unwrap()).await
    }

    async fn get(&self, uri: &str) -> Reply {
        self.call(Method::GET, uri, None).await
    }

    /// An authenticated call with a raw body and content type.
    async fn raw(&self, method: Method, uri: &str, content_type: &str, body: &str) -> Reply {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", content_type)
            .body(Body::from(body.to_string()))
            .unwrap();
        self.send(req).await
    }

    async fn with_role(self, name: &str) -> Self {
        let r = self
            .call(
                Method::PUT,
                &format!("/api/v1/roles/{name}"),
                Some(json!({"allow": ["*"]})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        self
    }
}

fn assert_error(r: &Reply, status: StatusCode, field: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.field(), field, "{}", r.text);
}

#[tokio::test]
async fn the_api_requires_the_admin_token() {
    let api = api().await;
    for auth in [
        None,
        Some("Bearer wrong-token-0123456789".to_string()),
        Some(format!("Basic {TOKEN}")),
        Some("Bearer".to_string()),
    ] {
        for path in ["/api/v1/keys", "/api/v1/audit", "/api/v1/no-such-thing"] {
            let mut req = Request::builder().uri(path);
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            let r = api.send(req.body(Body::empty()).unwrap()).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?} {path}");
            assert_eq!(r.json()["error"]["code"], "unauthenticated");
            assert_eq!(r.headers["www-authenticate"], "Bearer");
        }
    }
    // A POST without the token changes nothing.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/join-tokens")
        .body(Body::empty())
        .unwrap();
    assert_eq!(api.send(req).await.status, StatusCode::UNAUTHORIZED);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM join_tokens")
        .fetch_one(&api.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(api.get("/api/v1/keys").await.status, StatusCode::OK);
}

#[tokio::test]
async fn probes_and_the_openapi_document_need_no_token() {
    let api = api().await;
    let get = |path: &'static str| Request::builder().uri(path).body(Body::empty()).unwrap();
    let r = api.send(get("/healthz")).await;
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (StatusCode::OK, json!("ok"))
    );
    let r = api.send(get("/readyz")).await;
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (StatusCode::OK, json!("ready"))
    );
    // No recorder in tests: a JSON 404.
    let r = api.send(get("/metrics")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "not_found");
    let r = api.send(get("/api/v1/openapi.json")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let doc = r.json();
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/v1/keys",
        "/api/v1/keys/{id}",
        "/api/v1/keys/{id}/revoke",
        "/api/v1/keys/{id}/rotate",
        "/api/v1/policy",
        "/api/v1/roles/{name}",
        "/api/v1/backends/{name}",
        "/api/v1/jwt-issuers/{name}",
        "/api/v1/session-keys/rotate",
        "/api/v1/audit",
        "/api/v1/audit/export",
        "/api/v1/audit/tail",
        "/api/v1/audit/gaps",
        "/api/v1/audit/verify",
        "/api/v1/audit/dead-letters",
        "/api/v1/proxies",
        "/api/v1/join-tokens",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(paths.contains_key(p), "{p} missing from {:?}", paths.keys());
    }
    assert!(doc["components"]["securitySchemes"]["admin_token"].is_object());
    let r = api.send(get("/docs/")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text.contains("swagger"), "{}", r.text);
}

#[tokio::test]
async fn unknown_routes_methods_and_bodies_answer_json() {
    let api = api().await;
    let r = api
        .send(Request::builder().uri("/nope").body(Body::empty()).unwrap())
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "not_found");
    let r = api.get("/api/v1/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "not_found");
    let r = api.call(Method::DELETE, "/api/v1/keys", None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    assert!(r.headers.contains_key("allow"));
    // Not JSON, wrong content type, empty, wrong type, unknown field.
    let r = api
        .raw(
            Method::POST,
            "/api/v1/keys",
            "application/json",
            "{\"role\":",
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "body");
    let r = api
        .raw(Method::POST, "/api/v1/keys", "text/plain", "{}")
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "content-type");
    let r = api.call(Method::POST, "/api/v1/keys", None).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "body");
    let r = api
        .call(Method::POST, "/api/v1/keys", Some(json!({"role": 5})))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "role");
    let r = api
        .call(
            Method::POST,
            "/api/v1/keys",
            Some(json!({"role": "ops", "colour": "red"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.text.contains("colour"), "{}", r.text);
    // A body without a content type is read as JSON all the same.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/keys")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from(r#"{"role":"ghost"}"#))
        .unwrap();
    assert_error(&api.send(req).await, StatusCode::BAD_REQUEST, "role");
}

#[tokio::test]
async fn key_lifecycle_shows_the_secret_once() {
    let api = api().await.with_role("ops").await;
    let r = api
        .call(
            Method::POST,
            "/api/v1/keys",
            Some(json!({"role": "ops", "owner": "alice", "description": "laptop", "ttl": "30d"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let created = r.json();
    let secret = created["secret"].as_str().unwrap().to_string();
    let id = created["key"]["id"].as_str().unwrap().to_string();
    assert!(secret.starts_with("sntl_"));
    assert!(secret.starts_with(created["key"]["prefix"].as_str().unwrap()));
    assert_eq!(created["key"]["state"], "active");
    assert!(created["key"]["expires_at"].is_string());
    assert!(created["version"].as_u64().unwrap() > 0);

    // Never again: not in get, not in list.
    let r = api.get(&format!("/api/v1/keys/{id}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.text.contains(&secret) && r.json().get("secret").is_none());
    assert_eq!(r.json()["owner"], "alice");
    let r = api.get("/api/v1/keys").await;
    assert!(!r.text.contains(&secret));
    assert_eq!(r.json()["keys"].as_array().unwrap().len(), 1);

    let r = api
        .call(
            Method::POST,
            "/api/v1/keys",
            Some(json!({"role": "ops", "owner": "bob", "expires_at": "2099-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let bob = r.json()["key"]["id"].as_str().unwrap().to_string();
    let r = api.get("/api/v1/keys?owner=bob").await;
    let keys = r.json()["keys"].clone();
    assert_eq!(keys.as_array().unwrap().len(), 1);
    assert_eq!(keys[0]["id"], bob.as_str());
    assert_eq!(keys[0]["expires_at"], "2099-01-01T00:00:00Z");
    assert_eq!(
        api.get("/api/v1/keys?role=other").await.json()["keys"],
        json!([])
    );

    // Revoke: shown revoked, gone from the default list.
    let r = api
        .call(Method::POST, &format!("/api/v1/keys/{id}/revoke"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["key"]["state"], "revoked");
    assert_eq!(
        api.get("/api/v1/keys").await.json()["keys"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        api.get("/api/v1/keys?include_revoked=true").await.json()["keys"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Rotate: a new secret once, the old key kept for the grace period.
    let r = api
        .call(
            Method::POST,
            &format!("/api/v1/keys/{bob}/rotate"),
            Some(json!({"grace_seconds": 60})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let rotated = r.json();
    assert_eq!(rotated["key"]["rotated_from"], bob.as_str());
    assert!(rotated["secret"].as_str().unwrap().starts_with("sntl_"));
    let old = api.get(&format!("/api/v1/keys/{bob}")).await.json();
    assert_eq!(old["state"], "active");
    assert_ne!(old["expires_at"], "2099-01-01T00:00:00Z");
    // The rotated key with an empty body: revoked at once.
    let new_id = rotated["key"]["id"].as_str().unwrap().to_string();
    let r = api
        .call(Method::POST, &format!("/api/v1/keys/{new_id}/rotate"), None)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(
        api.get(&format!("/api/v1/keys/{new_id}")).await.json()["state"],
        "revoked"
    );

    // Refusals.
    let r = api
        .call(Method::POST, &format!("/api/v1/keys/{id}/rotate"), None)
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    assert_eq!(
        api.get("/api/v1/keys/nope").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.call(Method::POST, "/api/v1/keys/nope/revoke", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    for (body, field) in [
        (json!({"role": "ghost"}), "role"),
        (
            json!({"role": "ops", "expires_at": "tomorrow"}),
            "expires_at",
        ),
        (
            json!({"role": "ops", "expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at",
        ),
        (json!({"role": "ops", "ttl": "3 weeks"}), "ttl"),
        (json!({"role": "ops", "ttl": 0}), "ttl"),
        (
            json!({"role": "ops", "ttl": 60, "expires_at": "2099-01-01T00:00:00Z"}),
            "ttl",
        ),
        (json!({"role": "ops", "owner": "x".repeat(300)}), "owner"),
    ] {
        let r = api.call(Method::POST, "/api/v1/keys", Some(body)).await;
        assert_error(&r, StatusCode::BAD_REQUEST, field);
    }
    let r = api
        .call(
            Method::POST,
            &format!("/api/v1/keys/{bob}/rotate"),
            Some(json!({"grace_seconds": 99_999_999})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "grace_seconds");
    let r = api.get("/api/v1/keys?include_revoked=maybe").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "include_revoked");
}

#[tokio::test]
async fn policy_apply_names_the_field_and_dry_run_changes_nothing() {
    let api = api().await;
    let before = api.get("/api/v1/policy").await.json();
    let v0 = before["version"].as_u64().unwrap();

    let bad = json!({"roles": [
        {"name": "b", "allow": ["*", "["]},
        {"name": "a", "allow": ["*"]},
    ]});
    let r = api
        .call(Method::PUT, "/api/v1/policy", Some(bad.clone()))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "roles[0].allow[1]");
    let r = api
        .call(
            Method::PUT,
            "/api/v1/policy",
            Some(json!({"roles": [{"name": "a", "allow": ["x", 1]}]})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "roles[0].allow[1]");
    let r = api
        .call(Method::PUT, "/api/v1/policy", Some(json!({"rolez": []})))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("rolez"), "{}", r.text);

    let good = json!({
        "roles": [{"name": "reader", "allow": ["everything/echo"]}],
        "audit": {"max_argument_bytes": 1024, "max_response_bytes": 512, "retention_days": 30},
    });
    let r = api
        .call(
            Method::PUT,
            "/api/v1/policy?dry_run=true",
            Some(good.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let dry = r.json();
    assert_eq!(dry["applied"], false);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["version"].as_u64(), Some(v0));
    assert_eq!(dry["changes"], json!(["+ role reader", "~ audit"]));
    assert_eq!(api.get("/api/v1/policy").await.json(), before);

    let r = api
        .call(
            Method::PUT,
            "/api/v1/policy?dry_run=perhaps",
            Some(good.clone()),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "dry_run");

    let r = api
        .call(
            Method::PUT,
            "/api/v1/policy?dry_run=false",
            Some(good.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["applied"], true);
    assert_eq!(r.json()["version"].as_u64(), Some(v0 + 1));
    let now = api.get("/api/v1/policy").await.json();
    assert_eq!(now["version"].as_u64(), Some(v0 + 1));
    assert_eq!(now["spec"]["roles"][0]["name"], "reader");
    assert_eq!(now["spec"]["audit"]["retention_days"], 30);
    // The same document again is a no-op.
    let r = api.call(Method::PUT, "/api/v1/policy", Some(good)).await;
    assert_eq!(r.json()["changes"], json!([]));
    assert_eq!(r.json()["applied"], false);
}

#[tokio::test]
async fn per_object_writes_redact_secrets_on_read() {
    let api = api().await.with_role("ops").await;
    let backend = json!({
        "url": "http://127.0.0.1:9/mcp",
        "headers": {"Authorization": "Bearer upstream-s3cret"},
    });
    let r = api
        .call(Method::PUT, "/api/v1/backends/everything", Some(backend))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = api.get("/api/v1/policy").await;
    assert!(!r.text.contains("upstream-s3cret"), "{}", r.text);
    let shown = r.json();
    assert_eq!(
        shown["spec"]["backends"][0]["headers"]["Authorization"],
        "<redacted>"
    );
    // Writing the redacted document back keeps the secret.
    let r = api
        .call(Method::PUT, "/api/v1/policy", Some(shown["spec"].clone()))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["changes"], json!([]));
    let mut b = shown["spec"]["backends"][0].clone();
    b["timeout_ms"] = json!(5000);
    let r = api
        .call(Method::PUT, "/api/v1/backends/everything", Some(b))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let stored = api.db.store.policy_spec().await.unwrap();
    assert_eq!(
        stored.backends[0].headers["Authorization"],
        "Bearer upstream-s3cret"
    );
    assert_eq!(stored.backends[0].timeout_ms, 5000);

    // JWT issuer: the HMAC secret is redacted too.
    let issuer = json!({
        "issuer": "https://idp.example",
        "audiences": ["sentinel"],
        "algorithms": ["HS256"],
        "hmac_secret": "h".repeat(40),
        "default_role": "ops",
    });
    let r = api
        .call(Method::PUT, "/api/v1/jwt-issuers/idp", Some(issuer))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = api.get("/api/v1/policy").await;
    assert!(!r.text.contains(&"h".repeat(40)));
    assert_eq!(
        r.json()["spec"]["jwt_issuers"][0]["hmac_secret"],
        "<redacted>"
    );
    let r = api
        .call(
            Method::PUT,
            "/api/v1/jwt-issuers/idp2",
            Some(json!({"issuer": "https://x", "audiences": ["a"], "algorithms": ["none"]})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "issuer.algorithms[0]");
    // A role an issuer defaults to cannot go.
    let r = api.call(Method::DELETE, "/api/v1/roles/ops", None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let r = api
        .call(Method::DELETE, "/api/v1/jwt-issuers/idp", None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // Roles: names must agree; validation names the field.
    let r = api
        .call(
            Method::PUT,
            "/api/v1/roles/ops",
            Some(json!({"name": "other", "allow": ["*"]})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "name");
    let r = api
        .call(
            Method::PUT,
            "/api/v1/roles/ops",
            Some(json!({"allow": ["*", "["]})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "role.allow[1]");
    let r = api
        .call(
            Method::PUT,
            "/api/v1/backends/bad",
            Some(json!({"url": "ftp://x"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.field().starts_with("backend."), "{}", r.text);

    let v = api.get("/api/v1/policy").await.json()["version"]
        .as_u64()
        .unwrap();
    let r = api
        .call(Method::POST, "/api/v1/session-keys/rotate", None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["version"].as_u64(), Some(v + 1));

    for path in ["/api/v1/backends/everything", "/api/v1/roles/ops"] {
        let r = api.call(Method::DELETE, path, None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
        let r = api.call(Method::DELETE, path, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {}", r.text);
    }
}

#[tokio::test]
async fn a_role_bound_to_keys_cannot_be_deleted() {
    let api = api().await.with_role("ops").await;
    let r = api
        .call(Method::POST, "/api/v1/keys", Some(json!({"role": "ops"})))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = api.call(Method::DELETE, "/api/v1/roles/ops", None).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    let r = api
        .call(Method::PUT, "/api/v1/policy", Some(json!({})))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
}

async fn with_audit(api: &Api) {
    api.db
        .store
        .ingest_batch("p1", chain("p1", 1, 25))
        .await
        .unwrap();
    api.db
        .store
        .ingest_batch("p2", chain("p2", 1, 5))
        .await
        .unwrap();
}

fn events(r: &Reply) -> Vec<Value> {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.json()["events"].as_array().unwrap().clone()
}

#[tokio::test]
async fn audit_query_filters_and_paginates_newest_first() {
    let api = api().await;
    with_audit(&api).await;
    let r = api.get("/api/v1/audit?limit=10").await;
    let page = events(&r);
    assert_eq!(page.len(), 10);
    let ts: Vec<i64> = page
        .iter()
        .map(|e| e["timestamp_us"].as_i64().unwrap())
        .collect();
    assert!(ts.windows(2).all(|w| w[0] >= w[1]), "{ts:?}");
    let mut seen: std::collections::HashSet<String> = page
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect();
    let mut cursor = r.json()["next_cursor"].as_str().map(str::to_string);
    while let Some(c) = cursor {
        let r = api.get(&format!("/api/v1/audit?limit=10&cursor={c}")).await;
        for e in events(&r) {
            assert!(seen.insert(e["event_id"].as_str().unwrap().to_string()));
        }
        cursor = r.json()["next_cursor"].as_str().map(str::to_string);
    }
    assert_eq!(seen.len(), 30);

    let first = &page[0];
    assert_eq!(
        first["outcome"]
            .as_str()
            .map(|o| o == "ok" || o == "forbidden"),
        Some(true)
    );
    assert_eq!(first["hash"].as_str().unwrap().len(), 64);
    assert_eq!(first["chain_ok"], true);

    for (query, n) in [
        ("proxy_id=p2", 5),
        ("tool=echo&proxy_id=p1", 12),
        ("outcome=forbidden", 9),
        ("subject=alice&limit=1000", 30),
        ("key_id=key1&limit=1000", 30),
        ("role=ops&backend=everything&limit=1000", 30),
        ("request_id=req-3", 2),
        ("subject=bob", 0),
        ("chain_broken_only=true", 0),
        ("from=2000-01-01T00:00:00Z&to=2001-01-01T00:00:00Z", 0),
        ("from=2000-01-01T00:00:00Z&limit=1000", 30),
    ] {
        let r = api.get(&format!("/api/v1/audit?{query}")).await;
        assert_eq!(events(&r).len(), n, "{query}");
    }
}

#[tokio::test]
async fn bad_audit_parameters_are_named() {
    let api = api().await;
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=ten", "limit"),
        ("limit=5000", "limit"),
        ("from=yesterday", "from"),
        ("to=2026-13-01T00:00:00Z", "to"),
        ("from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "from"),
        ("outcome=meh", "outcome"),
        ("cursor=!!", "cursor"),
        ("chain_broken_only=maybe", "chain_broken_only"),
        ("form=2026-01-01T00:00:00Z", "form"),
        ("tool=a&tool=b", "tool"),
    ] {
        let r = api.get(&format!("/api/v1/audit?{query}")).await;
        assert_error(&r, StatusCode::BAD_REQUEST, param);
        let r = api.get(&format!("/api/v1/audit/export?{query}")).await;
        if param != "limit" || query != "limit=5000" {
            assert_error(&r, StatusCode::BAD_REQUEST, param);
        }
    }
    let r = api.get("/api/v1/audit/export?format=xml").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "format");
    let r = api
        .get("/api/v1/audit/tail?from=2026-01-01T00:00:00Z")
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "from");
    let r = api.get("/api/v1/audit/dead-letters?limit=0").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "limit");
    let r = api.get("/api/v1/audit/gaps?proxy=p1").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "proxy");
    let req = Request::builder()
        .uri("/api/v1/audit/tail")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("last-event-id", "garbage")
        .body(Body::empty())
        .unwrap();
    assert_error(
        &api.send(req).await,
        StatusCode::BAD_REQUEST,
        "Last-Event-ID",
    );
}

#[tokio::test]
async fn audit_export_streams_every_page_as_ndjson_and_csv() {
    let api = api().await;
    // More than one page of the store's largest page (1000).
    api.db
        .store
        .ingest_batch("p1", chain("p1", 1, 1100))
        .await
        .unwrap();
    api.db
        .store
        .ingest_batch("p2", chain("p2", 1, 5))
        .await
        .unwrap();

    let r = api.get("/api/v1/audit/export").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.headers["content-type"], "application/x-ndjson");
    let lines: Vec<Value> = r
        .text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1105);
    let ids: std::collections::HashSet<&str> = lines
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1105);
    let ts: Vec<i64> = lines
        .iter()
        .map(|e| e["timestamp_us"].as_i64().unwrap())
        .collect();
    assert!(ts.windows(2).all(|w| w[0] >= w[1]));

    let r = api
        .get("/api/v1/audit/export?format=ndjson&proxy_id=p2")
        .await;
    assert_eq!(r.text.lines().count(), 5);
    let r = api.get("/api/v1/audit/export?limit=7").await;
    assert_eq!(r.text.lines().count(), 7);
    let r = api.get("/api/v1/audit/export?limit=1003").await;
    assert_eq!(r.text.lines().count(), 1003);

    let r = api
        .get("/api/v1/audit/export?format=csv&outcome=forbidden")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let rows: Vec<&str> = r.text.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert!(rows[0].starts_with("event_id,timestamp,received_at,"));
    // 1100/3 from p1 and 1 from p2 are forbidden.
    assert_eq!(rows.len(), 1 + 366 + 1);
    assert!(rows[1].contains(",forbidden,"), "{}", rows[1]);
    // The arguments column holds JSON with commas and quotes: quoted.
    assert!(rows[1].contains(r#""{""message"":""hi""}""#), "{}", rows[1]);

    // Nothing matches: an empty export, with its header for CSV.
    let r = api.get("/api/v1/audit/export?subject=nobody").await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::OK, ""));
    let r = api
        .get("/api/v1/audit/export?subject=nobody&format=csv")
        .await;
    assert_eq!(r.text.lines().count(), 1);
}

/// Reads SSE frames until `n` audit events arrived; returns their data,
/// each with its SSE `id` added as `"sse_id"`.
async fn read_audit_events(body: Body, n: usize) -> Vec<Value> {
    let mut stream = body.into_data_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("audit events in time")
            .expect("stream open")
            .unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            if frame.lines().any(|l| l == "event: audit") {
                let data = frame
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap();
                let id = frame.lines().find_map(|l| l.strip_prefix("id: ")).unwrap();
                let mut v: Value = serde_json::from_str(data).unwrap();
                v["sse_id"] = json!(id);
                out.push(v);
            }
        }
    }
    out
}

#[tokio::test]
async fn audit_tail_streams_new_events_and_resumes() {
    let api = api().await;
    // Committed before the tail starts: not shown.
    api.db
        .store
        .ingest_batch("p0", chain("p0", 1, 3))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let req = |uri: &str| {
        Request::builder()
            .uri(uri)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .unwrap()
    };
    let all = api
        .app
        .clone()
        .oneshot(req("/api/v1/audit/tail"))
        .await
        .unwrap();
    assert_eq!(all.status(), StatusCode::OK);
    assert!(
        all.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let only_p2 = api
        .app
        .clone()
        .oneshot(req("/api/v1/audit/tail?proxy_id=p2&outcome=forbidden"))
        .await
        .unwrap();
    api.db
        .store
        .ingest_batch("p1", chain("p1", 1, 4))
        .await
        .unwrap();
    api.db
        .store
        .ingest_batch("p2", chain("p2", 1, 6))
        .await
        .unwrap();
    let seen = read_audit_events(all.into_body(), 10).await;
    let proxies: Vec<&str> = seen
        .iter()
        .map(|e| e["proxy_id"].as_str().unwrap())
        .collect();
    assert!(!proxies.contains(&"p0"), "{proxies:?}");
    assert_eq!(proxies.iter().filter(|p| **p == "p1").count(), 4);
    let filtered = read_audit_events(only_p2.into_body(), 2).await;
    assert!(
        filtered
            .iter()
            .all(|e| e["proxy_id"] == "p2" && e["outcome"] == "forbidden")
    );
    let seqs: Vec<u64> = filtered
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 6]);

    // A client reconnecting with the id of the 4th event gets the 6 after it.
    let mut resume = req("/api/v1/audit/tail");
    resume.headers_mut().insert(
        "last-event-id",
        seen[3]["sse_id"].as_str().unwrap().parse().unwrap(),
    );
    let again = api.app.clone().oneshot(resume).await.unwrap();
    let rest = read_audit_events(again.into_body(), 6).await;
    let ids = |v: &[Value]| -> Vec<String> {
        v.iter()
            .map(|e| e["event_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&rest), ids(&seen[4..]));
}

#[tokio::test]
async fn gaps_verify_and_dead_letters() {
    let api = api().await;
    let r = api.get("/api/v1/audit/verify").await;
    assert_eq!(
        r.json(),
        json!({"ok": true, "chains": 0, "events": 0, "problems": []})
    );
    let mut evs = chain("p1", 1, 6);
    evs.remove(2);
    evs[3].event_id = "not-a-uuid".into();
    api.db.store.ingest_batch("p1", evs).await.unwrap();

    let r = api.get("/api/v1/audit/gaps").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let gaps = r.json()["gaps"].clone();
    assert_eq!(gaps[0]["proxy_id"], "p1");
    assert_eq!(
        (gaps[0]["from_seq"].as_u64(), gaps[0]["to_seq"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(
        api.get("/api/v1/audit/gaps?proxy_id=p9").await.json()["gaps"],
        json!([])
    );

    let r = api.get("/api/v1/audit/verify?proxy_id=p1").await;
    let report = r.json();
    assert_eq!(report["ok"], false);
    assert_eq!(report["events"], 4);
    assert!(
        report["problems"][0].as_str().unwrap().contains("missing"),
        "{report}"
    );

    let r = api.get("/api/v1/audit/dead-letters").await;
    let dl = r.json()["dead_letters"].clone();
    assert_eq!(dl.as_array().unwrap().len(), 1, "{dl}");
    assert_eq!(dl[0]["proxy_id"], "p1");
    assert!(
        dl[0]["reason"].as_str().unwrap().starts_with("event_id"),
        "{dl}"
    );
}

#[tokio::test]
async fn near_gap_shows_the_events_around_missing_records() {
    let api = api().await;
    let evs = chain("p1", 2, 6);
    // 1, 2 and 5 arrive (3 and 4 missing), plus a chain without a gap.
    api.db
        .store
        .ingest_batch("p1", vec![evs[0].clone(), evs[1].clone(), evs[4].clone()])
        .await
        .unwrap();
    api.db
        .store
        .ingest_batch("p2", chain("p2", 1, 4))
        .await
        .unwrap();
    let r = api.get("/api/v1/audit?near_gap=true").await;
    let page = events(&r);
    let got: Vec<(u64, Value)> = page
        .iter()
        .map(|e| (e["sequence"].as_u64().unwrap(), e["borders_gaps"].clone()))
        .collect();
    let gap = json!([{"from_seq": 3, "to_seq": 4}]);
    assert_eq!(got, vec![(5, gap.clone()), (2, gap.clone())]);
    assert!(
        page.iter()
            .all(|e| e["proxy_id"] == "p1" && e["epoch"] == 2)
    );
    // Paged with a cursor, and combined with another filter.
    let r = api.get("/api/v1/audit?near_gap=true&limit=1").await;
    assert_eq!(events(&r)[0]["sequence"], 5);
    let cursor = r.json()["next_cursor"].as_str().unwrap().to_string();
    let r = api
        .get(&format!(
            "/api/v1/audit?near_gap=true&limit=1&cursor={cursor}"
        ))
        .await;
    assert_eq!(events(&r)[0]["sequence"], 2);
    assert!(r.json()["next_cursor"].is_null(), "{}", r.text);
    let r = api.get("/api/v1/audit?near_gap=true&tool=get-sum").await;
    let page = events(&r);
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["sequence"], 5);
    // Without the filter the border is still marked; others show [].
    let r = api.get("/api/v1/audit?proxy_id=p1").await;
    let marks: Vec<Value> = events(&r)
        .iter()
        .map(|e| e["borders_gaps"].clone())
        .collect();
    assert_eq!(marks, vec![gap.clone(), gap.clone(), json!([])]);
    // Export takes the filter too, and the CSV names the gap.
    let r = api.get("/api/v1/audit/export?near_gap=true").await;
    assert_eq!(r.text.lines().count(), 2, "{}", r.text);
    let r = api
        .get("/api/v1/audit/export?near_gap=true&format=csv")
        .await;
    let rows: Vec<&str> = r.text.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert!(rows[0].ends_with(",borders_gaps"), "{}", rows[0]);
    assert_eq!(rows.len(), 3);
    assert!(rows[1].ends_with(",3-4"), "{}", rows[1]);
    // Not a tail parameter; a bad value is named.
    let r = api.get("/api/v1/audit/tail?near_gap=true").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "near_gap");
    let r = api.get("/api/v1/audit?near_gap=perhaps").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "near_gap");
    // The hole is filled: nothing is near a gap any more.
    api.db
        .store
        .ingest_batch("p1", vec![evs[2].clone(), evs[3].clone()])
        .await
        .unwrap();
    let r = api.get("/api/v1/audit?near_gap=true").await;
    assert!(events(&r).is_empty(), "{}", r.text);
    assert!(r.json()["next_cursor"].is_null());
}

#[tokio::test]
async fn fleet_lists_proxies_and_join_tokens_show_once() {
    let api = api().await;
    assert_eq!(
        api.get("/api/v1/proxies").await.json(),
        json!({"proxies": []})
    );
    let labels = std::collections::HashMap::from([("zone".to_string(), "a".to_string())]);
    api.db
        .store
        .proxy_connected("p1", "0.1.0", &labels, "cp-1")
        .await
        .unwrap();
    api.db.store.proxy_acked("p1", 4).await.unwrap();
    let r = api.get("/api/v1/proxies").await;
    let p = r.json()["proxies"][0].clone();
    assert_eq!(p["proxy_id"], "p1");
    assert_eq!(p["connected"], true);
    assert_eq!(p["acked_version"], 4);
    assert_eq!(p["labels"]["zone"], "a");
    assert_eq!(p["build_version"], "0.1.0");

    let r = api.call(Method::POST, "/api/v1/join-tokens", None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let token = r.json()["token"].as_str().unwrap().to_string();
    assert!(api.db.store.check_join_token(&token).await.unwrap());
    let r = api
        .call(
            Method::POST,
            "/api/v1/join-tokens",
            Some(json!({"description": "fleet b"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = api
        .call(
            Method::POST,
            "/api/v1/join-tokens",
            Some(json!({"description": "x".repeat(2000)})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "description");
    let r = api.get("/api/v1/proxies?all=1").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "all");
}

#[tokio::test]
async fn nul_characters_are_a_400_not_a_database_error() {
    let api = api().await.with_role("ops").await;
    for (uri, field) in [
        ("/api/v1/keys/a%00b", "path"),
        ("/api/v1/keys?owner=a%00b", "owner"),
        ("/api/v1/audit?subject=a%00b", "subject"),
        ("/api/v1/audit/export?tool=a%00b", "tool"),
    ] {
        assert_error(&api.get(uri).await, StatusCode::BAD_REQUEST, field);
    }
    let r = api
        .call(
            Method::POST,
            "/api/v1/keys",
            Some(json!({"role": "ops", "owner": "a\u{0}b"})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "owner");
    let r = api
        .call(
            Method::PUT,
            "/api/v1/policy",
            Some(json!({"roles": [{"name": "ops", "allow": ["*", "x\u{0}"]}]})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "roles[0].allow[1]");
}

#[tokio::test]
async fn live_tails_end_at_shutdown() {
    let db = TestDb::new().await;
    let state = AppState {
        store: db.store.clone(),
        config: Arc::new(Config {
            database_url: db.url.clone(),
            admin_tokens: vec![TOKEN.into()],
            ..Default::default()
        }),
        metrics: None,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = super::router_until(state, shutdown.clone());
    let req = Request::builder()
        .uri("/api/v1/audit/tail")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body().into_data_stream();
    shutdown.cancel();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = body.next().await {
            chunk.unwrap();
        }
    })
    .await;
    assert!(end.is_ok(), "the tail outlived the shutdown");
}

/// Every endpoint, fed malformed input: always a 4xx in our JSON shape (or
/// a success where the input is ignored), never a 5xx.
#[tokio::test]
async fn bad_input_never_gets_a_5xx() {
    let api = api().await.with_role("ops").await;
    let long = "x".repeat(5000);
    let routes: Vec<(Method, String)> = vec![
        (Method::POST, "/api/v1/keys".into()),
        (Method::GET, "/api/v1/keys".into()),
        (Method::GET, "/api/v1/keys/{}".into()),
        (Method::POST, "/api/v1/keys/{}/revoke".into()),
        (Method::POST, "/api/v1/keys/{}/rotate".into()),
        (Method::GET, "/api/v1/policy".into()),
        (Method::PUT, "/api/v1/policy".into()),
        (Method::PUT, "/api/v1/roles/{}".into()),
        (Method::DELETE, "/api/v1/roles/{}".into()),
        (Method::PUT, "/api/v1/backends/{}".into()),
        (Method::DELETE, "/api/v1/backends/{}".into()),
        (Method::PUT, "/api/v1/jwt-issuers/{}".into()),
        (Method::DELETE, "/api/v1/jwt-issuers/{}".into()),
        (Method::POST, "/api/v1/session-keys/rotate".into()),
        (Method::GET, "/api/v1/audit".into()),
        (Method::GET, "/api/v1/audit/export".into()),
        (Method::GET, "/api/v1/audit/gaps".into()),
        (Method::GET, "/api/v1/audit/verify".into()),
        (Method::GET, "/api/v1/audit/dead-letters".into()),
        (Method::GET, "/api/v1/proxies".into()),
        (Method::POST, "/api/v1/join-tokens".into()),
    ];
    let names = [
        "%FF%FE",
        "a%2Fb",
        "%20",
        long.as_str(),
        "..",
        "%3Cscript%3E",
    ];
    let bodies = [
        "not json",
        "[]",
        "null",
        "{\"name\":{}}",
        "{\"allow\":[\"\\ud800\"]}",
        "{\"role\":\"ops\",\"ttl\":-1}",
        "{\"grace_seconds\":1e99}",
        "{\"roles\":[{\"name\":\"a\",\"allow\":[\"*\"],\"rate_limits\":[{\"per_second\":-1,\"burst\":0}]}]}",
        "{\"backends\":[{\"name\":\"b\",\"url\":\"http://x\",\"headers\":{\"X\":\"<redacted>\"}}]}",
    ];
    let queries = [
        "bogus=1",
        "limit=-1",
        "limit=99999999999",
        "from=9999-12-31T23:59:59Z&to=0000-01-01T00:00:00Z",
        "from=0000-01-01T00:00:00Z",
        "cursor=MTIzfG5vdC1hLXV1aWQ",
        "dry_run=&include_revoked=",
    ];
    for (method, pattern) in &routes {
        for name in names {
            let path = pattern.replace("{}", name);
            for body in bodies {
                let r = api
                    .raw(method.clone(), &path, "application/json", body)
                    .await;
                check_no_5xx(&r, method, &path, body);
            }
            for q in queries {
                let uri = format!("{path}?{q}");
                let r = api.call(method.clone(), &uri, None).await;
                check_no_5xx(&r, method, &uri, "");
            }
            if !pattern.contains("{}") {
                break;
            }
        }
    }
    let r = api.get("/api/v1/audit/tail?bogus=1").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bogus");
}

fn check_no_5xx(r: &Reply, method: &Method, uri: &str, body: &str) {
    let what = format!("{method} {} {body}: {}", &uri[..uri.len().min(80)], r.text);
    assert!(r.status.as_u16() < 500, "{what}");
    if !r.status.is_success() {
        assert!(r.json()["error"]["code"].is_string(), "{what}");
    }
}
