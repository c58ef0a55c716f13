//! The common answer, passed through as the upstream wrote it.
//!
//! Most upstream answers are a plain JSON-RPC response: `jsonrpc`, `id`,
//! `result`, nothing else. The proxy changes only the id (the client's own),
//! so building a tree of the result, and writing it out again twice (once
//! for the client, once for the audit record), is wasted work on the hot
//! path. [`plain_result`] checks the envelope and borrows the result's text
//! (serde_json still checks that it is valid JSON); anything else, an error,
//! a request, a member JSON-RPC does not define, a repeated member, takes
//! the general path, which parses the whole message.

use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use serde_json::value::RawValue;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Plain<'a> {
    #[serde(rename = "jsonrpc")]
    _jsonrpc: Option<IgnoredAny>,
    #[serde(rename = "id")]
    _id: Option<IgnoredAny>,
    #[serde(borrow)]
    result: &'a RawValue,
}

/// The result of `body` if it is a plain response (see the module docs).
pub fn plain_result(body: &[u8]) -> Option<&RawValue> {
    serde_json::from_slice::<Plain<'_>>(body)
        .ok()
        .map(|p| p.result)
}

/// The response the client gets: its own `id`, the upstream's `result`
/// text unchanged.
pub fn result_message(id: &Value, result: &RawValue) -> Bytes {
    let result = result.get();
    let mut out = Vec::with_capacity(result.len() + 48);
    out.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
    // A `Value` always serialises (its map keys are strings).
    if serde_json::to_writer(&mut out, id).is_err() {
        out.extend_from_slice(b"null");
    }
    out.extend_from_slice(br#","result":"#);
    out.extend_from_slice(result.as_bytes());
    out.push(b'}');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_responses_pass_through_others_do_not() {
        let plain =
            br#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"a\"b"}]}}"#;
        let r = plain_result(plain).map(RawValue::get);
        assert_eq!(r, Some(r#"{"content":[{"type":"text","text":"a\"b"}]}"#));
        // Member order and whitespace do not matter; the text is kept.
        let spaced = b"{ \"result\" : [1, 2] , \"id\":\"x\", \"jsonrpc\":\"2.0\" }";
        assert_eq!(plain_result(spaced).map(RawValue::get), Some("[1, 2]"));
        for other in [
            &br#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m"}}"#[..],
            br#"{"jsonrpc":"2.0","id":1,"result":{},"error":{}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"ping","result":{}}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":{},"extra":1}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":{},"result":{}}"#,
            br#"{"jsonrpc":"2.0","id":1}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":{"a":}}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":{}} trailing"#,
            br#"[{"jsonrpc":"2.0","id":1,"result":{}}]"#,
            b"",
        ] {
            assert!(
                plain_result(other).is_none(),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn the_message_carries_the_clients_id() {
        let body = br#"{"jsonrpc":"2.0","id":"upstream-id","result":{"ok":true}}"#;
        let result = plain_result(body).expect("plain");
        for id in [json!(3), json!("c-1"), json!(null)] {
            let out = result_message(&id, result);
            let v: Value = serde_json::from_slice(&out).expect("valid json");
            assert_eq!(
                v,
                json!({"jsonrpc": "2.0", "id": id, "result": {"ok": true}})
            );
        }
    }
}
