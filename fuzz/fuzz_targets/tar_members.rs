//! The tar member check: a member it accepts, joined to any folder and resolved lexically,
//! never leaves that folder.
#![no_main]

use std::path::{Component, Path, PathBuf};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(member) = std::str::from_utf8(data) else {
        return;
    };
    if !drop_supervisor::runtime::images::member_is_safe(member) {
        return;
    }
    let root = Path::new("/staging/root");
    let mut resolved = PathBuf::from(root);
    for c in Path::new(member).components() {
        match c {
            Component::Normal(part) => resolved.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                resolved.pop();
            }
            Component::RootDir | Component::Prefix(_) => resolved = PathBuf::from("/"),
        }
    }
    assert!(
        resolved.starts_with(root),
        "{member:?} resolves to {resolved:?}"
    );
});
