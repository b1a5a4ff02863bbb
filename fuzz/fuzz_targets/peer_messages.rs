//! What another node may send: a sealed peer request (header and body), its sealed reply, a
//! signature header and a multicast announcement are refused or accepted without a panic, and
//! nothing forged opens.
#![no_main]

use libfuzzer_sys::fuzz_target;

use drop_supervisor::cluster::discovery::parse_announcement;
use drop_supervisor::cluster::peer::PeerKey;
use drop_supervisor::cluster::seal::{Opener, Sealer};

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fuzz_target!(|data: &[u8]| {
    let key = PeerKey::derive(KEY).expect("the fixed key derives");
    let now = 1_800_000_000_000;
    let (header, body) = data.split_at(data.len().min(80));
    let header = String::from_utf8_lossy(header);
    if key
        .verify(Some(&header), "POST", "/api/v1/p", body, now)
        .is_ok()
    {
        // Only the real signature of this request passes.
        let ts: u64 = header.split('.').next().unwrap().parse().unwrap();
        assert_eq!(header, key.sign(ts, "POST", "/api/v1/p", body));
    }
    let _ = parse_announcement(&key, data, now);
    // Sealed requests: arbitrary header and body never open under a key the input cannot know.
    let base = [7u8; 32];
    let opener = Opener::new(&base);
    assert!(
        opener
            .open(Some(&header), body, "10.0.0.2:7947", now)
            .is_err()
    );
    // A real request with the input as its body opens once, and its reply opens only as sent.
    let sealer = Sealer::new(&base);
    let req = sealer.seal(
        "10.0.0.2:7947".parse().unwrap(),
        "POST",
        "/api/v1/p",
        body,
        now,
    );
    let opened = opener
        .open(Some(&req.header), &req.body, "10.0.0.2:7947", now)
        .expect("a real request opens");
    assert_eq!(opened.body, body);
    assert!(
        opener
            .open(Some(&req.header), &req.body, "10.0.0.2:7947", now)
            .is_err()
    );
    let reply = opened.reply.seal(200, "text/plain", data);
    assert_eq!(req.reply.open(&reply).expect("its reply opens").body, data);
    assert!(req.reply.open(body).is_err() || body == reply.as_slice());
});
