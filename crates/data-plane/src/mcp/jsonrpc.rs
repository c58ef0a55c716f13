//! JSON-RPC 2.0 as MCP uses it: message kinds, error bodies, and the
//! protocol constants of both eras. Messages stay `serde_json::Value` so
//! unknown fields, `_meta` and ids pass through untouched.

use serde_json::{Value, json};

/// The stateless era.
pub const MODERN_VERSION: &str = "2026-07-28";
/// Legacy session-based versions this proxy serves, oldest first.
pub const LEGACY_VERSIONS: [&str; 3] = ["2025-03-26", "2025-06-18", "2025-11-25"];
/// The only version that allows JSON-RPC batches.
pub const BATCH_VERSION: &str = "2025-03-26";

pub const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
pub const META_CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Notification,
    /// A client's answer to a request an upstream sent it.
    Response,
}

/// Checks the envelope of one message.
pub fn classify(v: &Value) -> Result<Kind, String> {
    let Some(obj) = v.as_object() else {
        return Err("a message must be a JSON object".into());
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err("'jsonrpc' must be \"2.0\"".into());
    }
    let id_ok = |id: &Value| id.is_string() || id.is_number();
    match (obj.get("method"), obj.get("id")) {
        (Some(m), id) => {
            if !m.is_string() {
                return Err("'method' must be a string".into());
            }
            // MCP always names its params; positional (array) params would
            // also leave the proxy nowhere to put a routed name.
            if let Some(p) = obj.get("params")
                && !p.is_object()
            {
                return Err("'params' must be an object".into());
            }
            match id {
                None => Ok(Kind::Notification),
                Some(id) if id_ok(id) => Ok(Kind::Request),
                Some(_) => Err("'id' must be a string or a number".into()),
            }
        }
        (None, Some(id))
            if id_ok(id) && (obj.contains_key("result") || obj.contains_key("error")) =>
        {
            Ok(Kind::Response)
        }
        _ => Err("not a request, notification or response".into()),
    }
}

pub fn method(v: &Value) -> &str {
    v.get("method").and_then(Value::as_str).unwrap_or("")
}

/// The param mirrored in `Mcp-Name` for methods that name something.
pub fn name_param<'a>(method: &str, msg: &'a Value) -> Option<&'a str> {
    let key = match method {
        "tools/call" | "prompts/get" => "name",
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => "uri",
        _ => return None,
    };
    msg.get("params")?.get(key)?.as_str()
}

pub fn error_body(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

pub fn result_body(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        let cases = [
            (
                json!({"jsonrpc":"2.0","id":1,"method":"ping"}),
                Ok(Kind::Request),
            ),
            (
                json!({"jsonrpc":"2.0","id":"a","method":"x","params":{}}),
                Ok(Kind::Request),
            ),
            (
                json!({"jsonrpc":"2.0","method":"notifications/initialized"}),
                Ok(Kind::Notification),
            ),
            (
                json!({"jsonrpc":"2.0","id":3,"result":{}}),
                Ok(Kind::Response),
            ),
            (
                json!({"jsonrpc":"2.0","id":3,"error":{"code":1,"message":"m"}}),
                Ok(Kind::Response),
            ),
        ];
        for (v, want) in cases {
            assert_eq!(
                classify(&v).map_err(|_| ()),
                want.map_err(|_: ()| ()),
                "{v}"
            );
        }
        for bad in [
            json!([]),
            json!("x"),
            json!({"id":1,"method":"ping"}),
            json!({"jsonrpc":"1.0","id":1,"method":"ping"}),
            json!({"jsonrpc":"2.0","id":{},"method":"ping"}),
            json!({"jsonrpc":"2.0","id":1,"method":5}),
            json!({"jsonrpc":"2.0","id":1,"method":"x","params":3}),
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":["a"]}),
            json!({"jsonrpc":"2.0","id":1}),
        ] {
            assert!(classify(&bad).is_err(), "{bad}");
        }
    }
}
