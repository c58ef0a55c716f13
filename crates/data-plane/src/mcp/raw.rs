//! The common answer, passed through as the upstream wrote it.
//!
//! Most upstream answers are a plain JSON-RPC response: `jsonrpc`, `id`,
//! `result`, nothing else. The proxy changes only the id (the client's own),
//! so building a tree of the result, and writing it out again twice (once
//! for the client, once for the audit record), is wasted work on the hot
//! path. [`plain`] checks the envelope and borrows the result's text
//! (serde_json still checks that it is valid JSON); anything else, an error,
//! a request, a member JSON-RPC does not define, a repeated member, takes
//! the general path, which parses the whole message.

use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use serde_json::value::RawValue;

/// A plain response, borrowed from its text.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plain<'a> {
    #[serde(rename = "jsonrpc")]
    _jsonrpc: Option<IgnoredAny>,
    #[serde(borrow)]
    pub id: Option<&'a RawValue>,
    #[serde(borrow)]
    pub result: &'a RawValue,
}

/// `body` as a plain response, if it is one (see the module docs).
pub fn plain(body: &[u8]) -> Option<Plain<'_>> {
    serde_json::from_slice::<Plain<'_>>(body).ok()
}

/// Whether a raw id is `want` (the comparison the general path makes on
/// parsed messages).
pub fn same_id(id: &RawValue, want: &Value) -> bool {
    serde_json::from_str::<Value>(id.get()).is_ok_and(|v| &v == want)
}

/// Whether `text` can be one SSE `data:` line as it is (an event's data
/// holds no line breaks; a message spread over lines is written out again).
pub fn fits_one_line(text: &str) -> bool {
    !text.contains(['\n', '\r'])
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
        let plain_ =
            br#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"a\"b"}]}}"#;
        let r = plain(plain_).map(|p| p.result.get());
        assert_eq!(r, Some(r#"{"content":[{"type":"text","text":"a\"b"}]}"#));
        // Member order and whitespace do not matter; the text is kept.
        let spaced = b"{ \"result\" : [1, 2] , \"id\":\"x\", \"jsonrpc\":\"2.0\" }";
        assert_eq!(plain(spaced).map(|p| p.result.get()), Some("[1, 2]"));
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
            // Not UTF-8 inside the result: refused, never a panic.
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":\"\xce\xf8\"}",
        ] {
            assert!(plain(other).is_none(), "{}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn ids_compare_as_values_and_line_breaks_are_seen() {
        let p = plain(br#"{"jsonrpc":"2.0","id":"c-1","result":{}}"#).expect("plain");
        let id = p.id.expect("id");
        assert!(same_id(id, &json!("c-1")));
        assert!(!same_id(id, &json!("c-2")));
        assert!(!same_id(id, &json!(1)));
        let n = plain(br#"{"id":7,"result":{}}"#).expect("plain");
        assert!(same_id(n.id.expect("id"), &json!(7)));
        assert!(
            plain(br#"{"id":null,"result":{}}"#)
                .expect("plain")
                .id
                .is_none()
        );
        assert!(fits_one_line(r#"{"a":"x\ny"}"#));
        assert!(!fits_one_line("{\n\"a\":1}"));
        assert!(!fits_one_line("{\r\"a\":1}"));
    }

    #[test]
    fn the_message_carries_the_clients_id() {
        let body = br#"{"jsonrpc":"2.0","id":"upstream-id","result":{"ok":true}}"#;
        let result = plain(body).expect("plain").result;
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
