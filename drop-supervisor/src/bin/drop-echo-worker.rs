//! `drop-echo-worker`: the smallest DROP function, for tests and benchmarks. It reads request
//! lines on stdin and writes each back unchanged, flushing after every line. Because an async
//! request `<id>::<payload>` echoed back is a valid async reply, it serves both modes.

use std::io::{BufRead, Write};

fn main() {
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    let mut line = Vec::with_capacity(4096);
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if output
            .write_all(&line)
            .and_then(|()| output.flush())
            .is_err()
        {
            return;
        }
    }
}
