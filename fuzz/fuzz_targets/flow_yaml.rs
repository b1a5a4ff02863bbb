//! The flow YAML decoder: any text gives a flow or an error that names where, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) =
        drop_supervisor::runtime::flow::parse_flow(text, std::path::Path::new("fuzz.yaml"))
    {
        // Every error renders (file:line:column: key: what).
        let _ = e.to_string();
    }
});
