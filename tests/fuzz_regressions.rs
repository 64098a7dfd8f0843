//! Replays every input kept under `tests/data/fuzz-regressions/<target>/` through the fuzz harness
//! (the same code the libFuzzer targets call), as an ordinary test.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

#[path = "../fuzz/src/harness.rs"]
mod harness;

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz-regressions")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        run(&data);
        count += 1;
    }
    count
}

#[test]
fn request_regressions() {
    let replayed = replay("request", harness::request);
    harness::remove_data_dir();
    assert!(replayed > 0);
}

#[test]
fn sealed_record_regressions() {
    assert!(replay("sealed_record", harness::sealed_record) > 0);
}

#[test]
fn policy_file_regressions() {
    assert!(replay("policy_file", harness::policy_file) > 0);
}

#[test]
fn token_file_regressions() {
    assert!(replay("token_file", harness::token_file) > 0);
}

#[test]
fn audit_line_regressions() {
    assert!(replay("audit_line", harness::audit_line) > 0);
}
