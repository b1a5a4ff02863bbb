//! `service logs`: what the instances on this node wrote, from journald.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use super::spec::unit_name;
use crate::error::ApiError;

/// The last `lines` journal lines of the instances `here` of `ns/name`, oldest first.
pub fn read(
    ns: &str,
    name: &str,
    here: &[u32],
    journal: Option<&Path>,
    lines: u32,
) -> Result<Value, ApiError> {
    let mut out: Vec<String> = Vec::new();
    if !here.is_empty() {
        let mut cmd = Command::new("journalctl");
        cmd.args(["--no-pager", "--quiet", "-o", "short-iso", "-n"])
            .arg(lines.to_string());
        if let Some(dir) = journal {
            cmd.arg("--directory").arg(dir);
        }
        for i in here {
            cmd.arg("-u").arg(unit_name(ns, name, *i));
        }
        let result = cmd.output().map_err(|e| {
            ApiError::new(
                503,
                "journal_unavailable",
                format!("cannot run journalctl: {e}"),
            )
        })?;
        if !result.status.success() {
            return Err(ApiError::new(
                503,
                "journal_unavailable",
                format!(
                    "journalctl failed: {}",
                    String::from_utf8_lossy(&result.stderr).trim()
                ),
            ));
        }
        out = String::from_utf8_lossy(&result.stdout)
            .lines()
            .map(str::to_string)
            .collect();
    }
    Ok(json!({
        "service": name,
        "namespace": ns,
        "instances_here": here,
        "lines": out,
    }))
}
