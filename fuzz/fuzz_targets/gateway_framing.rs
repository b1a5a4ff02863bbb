//! The gateway's request framing and its envelope: any bytes give a request, "more bytes
//! needed" or an error with a status; a framed request's headers iterate, it wraps into an
//! envelope line that is valid JSON, and any reply maps to an answer or a 502.
#![no_main]

use libfuzzer_sys::fuzz_target;

use drop_supervisor::gateway::envelope;
use drop_supervisor::http;

fuzz_target!(|data: &[u8]| {
    match http::parse_head(data) {
        Ok(Some((head_len, req, content_length))) => {
            assert!(head_len <= data.len());
            let _ = content_length;
            let line = envelope::request_line(
                &req.method,
                &req.path,
                req.query.as_deref(),
                req.headers(),
                &data[head_len..],
            );
            assert!(!line.contains(&b'\n'), "an envelope is one line");
            serde_json::from_slice::<serde_json::Value>(&line).expect("an envelope is JSON");
        }
        Ok(None) => {}
        Err(e) => assert!((400..500).contains(&e.status()), "{e:?}"),
    }
    match envelope::reply("fuzz", data.to_vec()) {
        Ok(r) => {
            assert!((200..=599).contains(&r.status));
            for (name, value) in &r.headers {
                assert!(
                    http::extra_header_ok(name, value) || name.is_empty(),
                    "{name}"
                );
            }
        }
        Err(e) => assert_eq!(e.status, 502),
    }
});
