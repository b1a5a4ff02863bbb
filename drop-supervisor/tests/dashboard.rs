//! The Grafana dashboard the package ships uses only series that the daemon emits and the README
//! documents, and is valid JSON with a query per panel.

use std::collections::BTreeSet;
use std::path::Path;

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// `drop_…` names in `text` (a histogram's `_bucket`/`_count`/`_sum` series count as the base).
fn series(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("drop_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_count", "_sum"] {
            if let Some(base) = name.strip_suffix(suffix) {
                name = base;
            }
        }
        if name.len() > "drop_".len() {
            out.insert(name.to_string());
        }
        rest = &tail[end..];
    }
    out
}

fn source_text(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            source_text(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
}

#[test]
fn the_dashboard_uses_only_emitted_and_documented_series() {
    let text =
        std::fs::read_to_string(workspace().join("packaging/grafana/drop-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
    }
    let used = series(&text);
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let mut src = String::new();
    source_text(&workspace().join("drop-supervisor/src"), &mut src);
    let documented = series(&readme);
    for name in &used {
        assert!(
            src.contains(&format!("\"{name}"))
                || src.contains(&format!("{name}{{"))
                || src.contains(&format!("{name} ")),
            "the dashboard uses {name}, which the daemon does not emit"
        );
        assert!(
            documented.contains(name),
            "the dashboard uses {name}, which README's metrics table does not document"
        );
    }
    // Each area of the node has a panel.
    for name in [
        "drop_pool_requests_ok_total",
        "drop_vip_holder",
        "drop_lb_packets_total",
        "drop_events_total",
        "drop_node_draining",
    ] {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
}
