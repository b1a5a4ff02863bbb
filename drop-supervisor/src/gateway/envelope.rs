//! The original DROP's L7 envelope (its nginx front): a pool with `envelope: true` gets every
//! gateway request — any method, on `/api/v1/<pool>` or `/api/v1/<pool>/<sub-path>` — as one
//! JSON line, and its reply may set the HTTP status, body and headers.
//!
//! Request line: `{"uri", "headers", "args", "data", "method"}` where `uri` is the request
//! target (path and query), `headers` maps each lower-cased header name to its value (repeated
//! headers joined with `, `), `args` is the query string as a map with lower-cased,
//! percent-decoded keys (a key given once maps to its string, a repeated key to the list of its
//! values, a key without `=` to `true`), `data` is the raw body (as text; bytes that are not
//! UTF-8 become U+FFFD) and `method` is lower-case.
//!
//! Reply: a JSON object with `x_res_code` is answered with that status and `x_res_body` as the
//! body (a string as it is; any other JSON value re-encoded, as `application/json`), plus the
//! optional `x_res_headers` (an object of names to values). Any other reply passes through as
//! `200 text/plain`. A reply that claims an impossible status (not 200–599), or headers that
//! cannot be sent (a bad name or value, or one of the framing headers the gateway owns), is a
//! broken function: `502 bad_envelope_reply` with what was wrong.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// The answer a function's envelope reply asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    /// Extra headers, in the order the function gave them (without `Content-Type`).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Headers the gateway itself frames the answer with; a function may not set them.
const FRAMING: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
];

/// The request as one JSON line for the pool (no trailing newline: the pool frames lines).
pub fn request_line<'a>(
    method: &str,
    path: &str,
    query: Option<&str>,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    body: &[u8],
) -> Vec<u8> {
    let mut hmap = Map::new();
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        let value = String::from_utf8_lossy(value).trim().to_string();
        match hmap.get_mut(&name) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&value);
            }
            _ => {
                hmap.insert(name, Value::String(value));
            }
        }
    }
    let uri = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let envelope = serde_json::json!({
        "uri": uri,
        "headers": hmap,
        "args": args(query.unwrap_or("")),
        "data": String::from_utf8_lossy(body),
        "method": method.to_ascii_lowercase(),
    });
    serde_json::to_vec(&envelope).expect("an envelope serialises")
}

/// The query string as a map: lower-cased, percent-decoded keys.
fn args(query: &str) -> Map<String, Value> {
    let mut out = Map::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = match part.split_once('=') {
            Some((k, v)) => (k, Value::String(percent_decode(v))),
            None => (part, Value::Bool(true)),
        };
        let key = percent_decode(key).to_lowercase();
        match out.get_mut(&key) {
            None => {
                out.insert(key, value);
            }
            Some(Value::Array(list)) => list.push(value),
            Some(prev) => {
                let first = prev.take();
                *prev = Value::Array(vec![first, value]);
            }
        }
    }
    out
}

/// `%41+b` → `A b`; a `%` not followed by two hex digits stays as it is.
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) =>
            {
                out.push(h << 4 | l);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn bad(pool: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        502,
        "bad_envelope_reply",
        format!("pool {pool} answered an impossible envelope: {why}"),
    )
}

/// What to answer for `raw`, the reply line of pool `pool`.
pub fn reply(pool: &str, raw: Vec<u8>) -> Result<Reply, ApiError> {
    let plain = |raw| Reply {
        status: 200,
        content_type: "text/plain; charset=utf-8".into(),
        headers: Vec::new(),
        body: raw,
    };
    // Cheap test first: most plain replies are not JSON objects at all.
    if raw.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Ok(plain(raw));
    }
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(&raw) else {
        return Ok(plain(raw));
    };
    let Some(code) = obj.remove("x_res_code") else {
        return Ok(plain(raw));
    };
    let status = match &code {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
    .filter(|s| (200..=599).contains(s))
    .ok_or_else(|| {
        bad(
            pool,
            format!("x_res_code {code} is not an HTTP status 200-599"),
        )
    })?;
    let status = u16::try_from(status).expect("200..=599 fits");

    let mut content_type = "text/plain; charset=utf-8".to_string();
    let body = match obj.remove("x_res_body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.into_bytes(),
        Some(other) => {
            content_type = "application/json".into();
            serde_json::to_vec(&other).expect("JSON re-encodes")
        }
    };
    let mut headers = Vec::new();
    match obj.remove("x_res_headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, value) in map {
                let value = match value {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => {
                        return Err(bad(pool, format!("header {name:?} has the value {other}")));
                    }
                };
                if name.is_empty() || !name.bytes().all(is_token_byte) {
                    return Err(bad(pool, format!("{name:?} is not a header name")));
                }
                // No control character but tab (line breaks, NUL, DEL, ...): what a server may
                // send (`http::extra_header_ok`); found by the gateway_framing fuzz target.
                if value.bytes().any(|b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
                    return Err(bad(
                        pool,
                        format!("header {name} has a control character in its value"),
                    ));
                }
                let lower = name.to_ascii_lowercase();
                if FRAMING.contains(&lower.as_str()) {
                    return Err(bad(
                        pool,
                        format!("header {name} frames the answer and is the gateway's to set"),
                    ));
                }
                if lower == "content-type" {
                    content_type = value;
                } else {
                    headers.push((name, value));
                }
            }
        }
        Some(other) => return Err(bad(pool, format!("x_res_headers {other} is not an object"))),
    }
    Ok(Reply {
        status,
        content_type,
        headers,
        body,
    })
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(method: &str, path: &str, query: Option<&str>, body: &[u8]) -> Value {
        let headers: [(&str, &[u8]); 3] = [("Host", b"drop"), ("X-Trace", b"a"), ("x-trace", b"b")];
        serde_json::from_slice(&request_line(method, path, query, headers, body)).unwrap()
    }

    #[test]
    fn the_request_becomes_the_original_envelope() {
        let v = line(
            "PUT",
            "/api/v1/users/42",
            Some("Name=Ann%20Lee&tag=x&tag=y&flag&q=a+b"),
            b"{\"k\": 1}\nline two",
        );
        assert_eq!(v["method"], "put");
        assert_eq!(
            v["uri"],
            "/api/v1/users/42?Name=Ann%20Lee&tag=x&tag=y&flag&q=a+b"
        );
        assert_eq!(v["data"], "{\"k\": 1}\nline two");
        assert_eq!(v["headers"]["host"], "drop");
        assert_eq!(v["headers"]["x-trace"], "a, b");
        assert_eq!(v["args"]["name"], "Ann Lee");
        assert_eq!(v["args"]["tag"], serde_json::json!(["x", "y"]));
        assert_eq!(v["args"]["flag"], true);
        assert_eq!(v["args"]["q"], "a b");
        assert_eq!(
            v.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["args", "data", "headers", "method", "uri"]
        );
    }

    #[test]
    fn no_query_is_an_empty_map_and_the_line_has_no_newline() {
        let raw = request_line("GET", "/api/v1/p", None, [], b"a\nb");
        assert!(!raw.contains(&b'\n'));
        let v: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(v["args"], serde_json::json!({}));
        assert_eq!(v["uri"], "/api/v1/p");
    }

    #[test]
    fn broken_escapes_stay_as_they_are() {
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%41%62"), "Ab");
    }

    #[test]
    fn a_reply_with_a_code_sets_status_body_and_headers() {
        let r = reply(
            "p",
            br#"{"x_res_code": 201, "x_res_body": "made", "x_res_headers": {"Location": "/u/1", "X-N": 3}}"#
                .to_vec(),
        )
        .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.body, b"made");
        assert_eq!(r.content_type, "text/plain; charset=utf-8");
        assert_eq!(
            r.headers,
            vec![
                ("Location".into(), "/u/1".into()),
                ("X-N".into(), "3".into())
            ]
        );
    }

    #[test]
    fn a_json_body_is_re_encoded_and_content_type_may_be_set() {
        let r = reply(
            "p",
            br#"{"x_res_code": "404", "x_res_body": {"missing": [1, 2]}}"#.to_vec(),
        )
        .unwrap();
        assert_eq!(
            (r.status, r.content_type.as_str()),
            (404, "application/json")
        );
        assert_eq!(r.body, br#"{"missing":[1,2]}"#);
        let r = reply(
            "p",
            br#"{"x_res_code": 200, "x_res_body": "<b>", "x_res_headers": {"Content-Type": "text/html"}}"#
                .to_vec(),
        )
        .unwrap();
        assert_eq!((r.content_type.as_str(), r.headers.len()), ("text/html", 0));
    }

    #[test]
    fn other_replies_pass_through_as_200() {
        for raw in [
            &b"plain text"[..],
            b"{\"no_code\": 1}",
            b"{broken json",
            b"[1,2]",
            b"",
        ] {
            let r = reply("p", raw.to_vec()).unwrap();
            assert_eq!((r.status, r.body.as_slice()), (200, raw));
        }
    }

    #[test]
    fn impossible_replies_are_a_502_that_says_why() {
        let cases: [&[u8]; 9] = [
            br#"{"x_res_code": 99}"#,
            br#"{"x_res_code": 101}"#,
            br#"{"x_res_code": 600}"#,
            br#"{"x_res_code": "abc"}"#,
            br#"{"x_res_code": 200, "x_res_headers": {"Bad Name": "x"}}"#,
            br#"{"x_res_code": 200, "x_res_headers": {"X": "a\r\nSet-Cookie: y"}}"#,
            // A DEL in a value (fuzz finding): refused like a line break.
            b"{\"x_res_code\": 201, \"x_res_headers\": {\"~oc.tion\": \"c\x7f\x7funt/u/1=\"}}",
            br#"{"x_res_code": 200, "x_res_headers": {"Content-Length": "9"}}"#,
            br#"{"x_res_code": 200, "x_res_headers": ["X"]}"#,
        ];
        for raw in cases {
            let e = reply("p", raw.to_vec()).unwrap_err();
            assert_eq!(
                (e.status, e.code.as_str()),
                (502, "bad_envelope_reply"),
                "{e}"
            );
            assert!(e.message.contains("pool p"), "{e}");
        }
    }
}
