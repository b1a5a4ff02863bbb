//! What another node may send: a peer request's signature header and a multicast announcement
//! are refused or accepted without a panic, and nothing but a correct signature is accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;

use drop_supervisor::cluster::discovery::parse_announcement;
use drop_supervisor::cluster::peer::PeerKey;

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
});
