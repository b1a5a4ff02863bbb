//! The worker line protocol: decoding a line and the async `<id>::` framing never panic, and
//! encoding then decoding gives the payload back unless the payload itself holds the original
//! DROP token's halves (`\tncm`, `ncm\t`), which that encoding cannot carry (found by this
//! target, pinned in `protocol`'s unit tests); the line buffer yields lines within its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

use drop_supervisor::runtime::worker::protocol::{
    LineBuffer, LineLimit, decode_line, encode_async, encode_line, split_async,
};

fuzz_target!(|data: &[u8]| {
    let decoded = decode_line(data);
    let mut line = Vec::new();
    encode_line(&decoded, &mut line);
    // The encoded line ends with its newline and holds no other.
    assert_eq!(line.last(), Some(&b'\n'));
    assert!(!line[..line.len() - 1].contains(&b'\n'));
    let ambiguous = |p: &[u8]| p.windows(4).any(|w| w == b"\tncm" || w == b"ncm\t");
    // A trailing `\r` is read as a worker's CRLF and dropped: not data that round-trips.
    let round_trips = |p: &[u8]| !ambiguous(p) && !p.ends_with(b"\r");
    if round_trips(&decoded) {
        assert_eq!(decode_line(&line[..line.len() - 1]), decoded);
    }

    if let Some((id, payload)) = split_async(data) {
        let mut framed = Vec::new();
        encode_async(id, payload, &mut framed);
        let framed = &framed[..framed.len() - 1];
        let (id2, payload2) = split_async(framed).expect("an encoded async line splits");
        assert_eq!(id2, id);
        if !payload.contains(&b'\n') && round_trips(payload) {
            assert_eq!(payload2, payload);
        }
    }

    // Feed the bytes in reads of a size the input picks: until the buffer says the limit is
    // exceeded (the worker is then out of step), every line it hands out fits the limit.
    let step = usize::from(data.first().copied().unwrap_or(7) % 97) + 1;
    let mut buf = LineBuffer::new(64);
    for chunk in data.chunks(step) {
        let spare = buf.spare(chunk.len());
        spare[..chunk.len()].copy_from_slice(chunk);
        if buf.filled(chunk.len(), chunk.len()) == LineLimit::Exceeded {
            break;
        }
        while let Some(l) = buf.next_line() {
            assert!(
                l.len() <= 64,
                "a line of {} bytes passed a limit of 64",
                l.len()
            );
        }
    }
});
