//! Readers of the audit log: events, checkpoints, counts, and the schema and OCSF checks.

#![allow(unused_imports)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::*;

/// How a signed checkpoint line (the writer's own, about once a second) is told apart.
pub const CHECKPOINT_MARK: &str = r#""operation":"audit:checkpoint""#;

/// The writer's signed checkpoint events in `dir`, in chain order.
pub fn audit_checkpoints(dir: &Path) -> Vec<Value> {
    all_audit_lines(dir)
        .into_iter()
        .filter(|l| l.contains(CHECKPOINT_MARK))
        .map(|l| serde_json::from_str(&l).expect("audit line is JSON"))
        .collect()
}

/// Reads every event of every audit file in `dir`, in chain order, except the writer's
/// checkpoints (they come with time, not with requests: see [`audit_checkpoints`]).
pub fn audit_events(dir: &Path) -> Vec<Value> {
    all_audit_lines(dir)
        .into_iter()
        .filter(|l| !l.contains(CHECKPOINT_MARK))
        .map(|l| serde_json::from_str(&l).expect("audit line is JSON"))
        .collect()
}

/// Every complete line of every audit file in `dir`, in chain order.
pub(crate) fn all_audit_lines(dir: &Path) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p: &PathBuf| p.extension().is_some_and(|e| e == "jsonl"));
    files.sort();
    let mut events = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("audit file");
        // Only complete lines: the writer may be in the middle of appending the next one.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        for line in complete.lines() {
            events.push(line.to_owned());
        }
    }
    events
}

/// Counts complete audit lines incrementally, reading only what was appended since the last call.
#[derive(Default)]
pub struct AuditCounter {
    offsets: std::collections::HashMap<PathBuf, u64>,
    lines: usize,
}

impl AuditCounter {
    /// Complete lines in every audit file of `dir` so far.
    pub fn count(&mut self, dir: &Path) -> usize {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(entries) = std::fs::read_dir(dir) else {
            return self.lines;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "jsonl") {
                continue;
            }
            let offset = self.offsets.entry(path.clone()).or_default();
            let mut file = std::fs::File::open(&path).expect("audit file");
            file.seek(SeekFrom::Start(*offset)).expect("seek");
            let mut new = Vec::new();
            file.read_to_end(&mut new).expect("read");
            // Count only up to the last newline; a partial line is read again next time.
            if let Some(end) = new.iter().rposition(|&b| b == b'\n') {
                self.lines += String::from_utf8_lossy(&new[..=end])
                    .lines()
                    .filter(|l| !l.contains(CHECKPOINT_MARK))
                    .count();
                *offset += end as u64 + 1;
            }
        }
        self.lines
    }
}

/// The event with request id `id`.
pub fn event_for<'a>(events: &'a [Value], id: &str) -> &'a Value {
    let matching: Vec<_> = events
        .iter()
        .filter(|e| e["metadata"]["uid"] == id)
        .collect();
    assert_eq!(matching.len(), 1, "exactly one event for {id}");
    matching[0]
}

/// The pinned audit event schema, compiled (formats checked).
pub fn schema_validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("schema/audit-event-v1.schema.json")).unwrap(),
    )
    .unwrap();
    jsonschema::meta::validate(&schema).expect("the pinned schema is a valid JSON Schema");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles")
}

/// The real OCSF schema files at the version events declare: `METAPASS_OCSF_SCHEMA`, or
/// `../shared/ocsf-schema/<version>` beside the repository (scripts/test-all says which).
pub fn ocsf_schema_dir() -> Option<PathBuf> {
    let version = metapass::audit::event::OCSF_VERSION;
    let dir = std::env::var_os("METAPASS_OCSF_SCHEMA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/ocsf-schema").join(version));
    dir.join("dictionary.json").is_file().then_some(dir)
}

/// Runs tests/ocsf/validate_ocsf.py on `files`; returns (success, its report).
pub fn validate_ocsf(schema: &Path, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("python3")
        .arg(repo().join("tests/ocsf/validate_ocsf.py"))
        .arg(schema)
        .args(files)
        .output()
        .expect("run tests/ocsf/validate_ocsf.py");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Every event in the daemon's log validates against the real OCSF schema, when its files are
/// available (tests/audit_log.rs reports SKIPPED when they are not).
pub fn assert_valid_ocsf(daemon: &Daemon) {
    let Some(schema) = ocsf_schema_dir() else {
        return;
    };
    let files = metapass::audit::review::files_of(&daemon.audit_dir()).expect("audit files");
    let (ok, report) = validate_ocsf(&schema, &files);
    assert!(ok, "events that are not valid OCSF:\n{report}");
}
