//! The control API decoder: a request head and body as they arrive on the socket, framed the
//! way the gateway frames them, then decoded into a typed request or an error answer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head_len, mut req, _))) = drop_supervisor::http::parse_head(data) {
        req.body = data[head_len.min(data.len())..].to_vec();
        match drop_supervisor::control::api::decode(&req) {
            Ok(_) => {}
            Err(e) => {
                assert!((400..600).contains(&e.status), "{e:?}");
                let _ = e.to_json();
            }
        }
    }
});
