//! Runs the bad-input corpus (`tests/data/bad-inputs.toml`) against a real daemon, three times over:
//! every answer has the expected status and is never a 5xx, every answered request leaves exactly
//! one audit event, and the daemon stays up with flat memory.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Deserialize)]
struct Corpus {
    case: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    send: String,
    expect: u16,
    statuses: Option<Vec<u16>>,
    events: Option<usize>,
    setup: Option<String>,
    #[serde(default)]
    head: bool,
}

impl Case {
    fn statuses(&self) -> Vec<u16> {
        self.statuses.clone().unwrap_or_else(|| vec![self.expect])
    }
}

/// The values placeholders stand for, for one case.
struct Context {
    id: String,
    id2: String,
    unregistered: String,
}

fn hmac_hex(secret: &str, message: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex::encode(ring::hmac::sign(&key, message.as_bytes()).as_ref())
}

/// Renders a case's bytes: placeholders are `{NAME}` or `{NAME:argument}` with an upper-case name.
fn render(send: &str, ctx: &Context) -> Vec<u8> {
    let pattern = regex::Regex::new(r"\{([A-Z][A-Z0-9_]*)(?::([^}]*))?\}").unwrap();
    let sig = sign(&ctx.id);
    let mut out = Vec::new();
    let mut last = 0;
    let mut len_at = None;
    for m in pattern.captures_iter(send) {
        let whole = m.get(0).unwrap();
        out.extend_from_slice(&send.as_bytes()[last..whole.start()]);
        last = whole.end();
        let arg = m.get(2).map(|a| a.as_str()).unwrap_or("");
        let n = || arg.parse::<usize>().expect("a count");
        let value: Vec<u8> = match &m[1] {
            "ID" => ctx.id.clone().into_bytes(),
            "ID2" => ctx.id2.clone().into_bytes(),
            "SIG" => sig.clone().into_bytes(),
            "SIG2" => sign(&ctx.id2).into_bytes(),
            "UNREGISTERED" => ctx.unregistered.clone().into_bytes(),
            "SIG_UNREGISTERED" => sign(&ctx.unregistered).into_bytes(),
            "SIG_NOT_A_UUID" => sign("not-a-uuid").into_bytes(),
            "SIG_UPPER" => sig.to_uppercase().into_bytes(),
            "SIG_63" => sig.as_bytes()[..63].to_vec(),
            "SIG_B64" => base64::engine::general_purpose::STANDARD
                .encode(hex::decode(&sig).unwrap())
                .into_bytes(),
            "SIG_TENANT" => sign("project-a").into_bytes(),
            "SIG_SPACED" => format!("{} {}", &sig[..32], &sig[32..]).into_bytes(),
            "SIG_OTHER_SECRET" => hmac_hex("another-secret-entirely", &ctx.id).into_bytes(),
            "ZEROS" => vec![b'0'; n()],
            "ZZ" => vec![b'z'; n()],
            "PROXY" => format!(
                "X-Instance-ID: {}\r\nX-Tenant-ID: project-a\r\nX-Instance-ID-Signature: {sig}\r\n",
                ctx.id
            )
            .into_bytes(),
            "ADMIN" => format!("X-Auth-Token: {ADMIN_TOKEN}\r\n").into_bytes(),
            "TOKEN_A" => format!("X-Auth-Token: {TOKEN_A}\r\n").into_bytes(),
            "READER_A" => format!("X-Auth-Token: {READER_A}\r\n").into_bytes(),
            "TOKEN_B" => format!("X-Auth-Token: {TOKEN_B}\r\n").into_bytes(),
            "HEX" => arg
                .split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
                .collect(),
            "BYTES" => vec![b'a'; n()],
            "HEADERS" => (0..n())
                .flat_map(|i| format!("X-Filler-{i}: v\r\n").into_bytes())
                .collect(),
            "NEST" => [vec![b'['; n()], vec![b']'; n()]].concat(),
            "LEN" => {
                len_at = Some(out.len());
                Vec::new()
            }
            other => panic!("unknown placeholder {other}"),
        };
        out.extend_from_slice(&value);
    }
    out.extend_from_slice(&send.as_bytes()[last..]);
    if let Some(at) = len_at {
        let body_start = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head")
            + 4;
        let len = (out.len() - body_start).to_string();
        out.splice(at..at, len.into_bytes());
    }
    out
}

/// Sends `bytes` on a new TLS connection and reads up to `want` answers (or until the daemon
/// closes the connection); returns their statuses.
async fn exchange(client: &Client, bytes: &[u8], want: usize, head: bool) -> Vec<u16> {
    let mut stream = client.connect().await;
    // A write can fail once the daemon has answered and closed; the answers still count.
    let _ = stream.write_all(bytes).await;
    let _ = stream.flush().await;
    let mut buf = Vec::new();
    let mut statuses = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Parse every complete answer in the buffer.
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut response = httparse::Response::new(&mut headers);
            let Ok(httparse::Status::Complete(head_len)) = response.parse(&buf) else {
                break;
            };
            let status = response.code.expect("status");
            let length = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| {
                    std::str::from_utf8(h.value)
                        .unwrap()
                        .parse::<usize>()
                        .unwrap()
                })
                .unwrap_or(0);
            let body = if head || status < 200 || status == 204 || status == 304 {
                0
            } else {
                length
            };
            if buf.len() < head_len + body {
                break;
            }
            statuses.push(status);
            buf.drain(..head_len + body);
        }
        if statuses.len() >= want {
            return statuses;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return statuses,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Waits (up to 2 s) until at least `n` audit events are written; returns the count then.
async fn event_count_at_least(
    counter: &mut AuditCounter,
    dir: &std::path::Path,
    n: usize,
) -> usize {
    for _ in 0..200 {
        let count = counter.count(dir);
        if count >= n {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    counter.count(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bad_input_corpus() {
    let corpus: Corpus = toml::from_str(
        &std::fs::read_to_string(repo().join("tests/data/bad-inputs.toml")).unwrap(),
    )
    .unwrap();
    assert!(corpus.case.len() >= 150, "{} cases", corpus.case.len());
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), |t| {
        t.replace("body_read_timeout_secs = 10", "body_read_timeout_secs = 1")
    });
    let daemon = Daemon::start_with(&config, dir);
    let client = daemon.client();
    let audit_dir = daemon.audit_dir();
    let mut counter = AuditCounter::default();
    let mut rss = Vec::new();
    for pass in 0..3 {
        let mut failures = Vec::new();
        // (case name, audit events once it was done): a late extra event shows up at the next case.
        let mut previous: Option<(&str, usize)> = None;
        for case in &corpus.case {
            let ctx = Context {
                id: new_instance(),
                id2: new_instance(),
                unregistered: new_instance(),
            };
            client.register(&ctx.id, "project-a").await;
            client.register(&ctx.id2, "project-a").await;
            if case.setup.as_deref() == Some("password") {
                assert_eq!(
                    client
                        .post_password(&ctx.id, "project-a", "stored-blob")
                        .await
                        .status,
                    200
                );
            }
            let setup_events = 2 + usize::from(case.setup.is_some());
            let before = event_count_at_least(&mut counter, &audit_dir, 0).await;
            if let Some((name, done)) = previous
                && before != done + setup_events
            {
                failures.push(format!(
                    "{name}: {} late audit events",
                    before - done - setup_events
                ));
            }
            let expected = case.statuses();
            let got = exchange(
                &client,
                &render(&case.send, &ctx),
                expected.len(),
                case.head,
            )
            .await;
            if got.iter().any(|s| *s >= 500) {
                failures.push(format!("{}: a 5xx answer {got:?}", case.name));
            } else if got != expected {
                failures.push(format!("{}: expected {expected:?}, got {got:?}", case.name));
            }
            let want_events = case.events.unwrap_or(expected.len());
            let after = event_count_at_least(&mut counter, &audit_dir, before + want_events).await;
            if after != before + want_events {
                failures.push(format!(
                    "{}: {} audit events, expected {want_events}",
                    case.name,
                    after - before
                ));
            }
            previous = Some((&case.name, after));
        }
        assert!(
            failures.is_empty(),
            "pass {pass}: {} of {} cases failed:\n{}",
            failures.len(),
            corpus.case.len(),
            failures.join("\n")
        );
        assert_eq!(
            client.get("/healthz", &[]).await.status,
            200,
            "the daemon is up after pass {pass}"
        );
        rss.push(rss_kib(daemon.pid()));
    }
    // The exact total: setup requests plus every case's events, nothing more, nothing less.
    let setup: usize = corpus
        .case
        .iter()
        .map(|c| 2 + usize::from(c.setup.is_some()))
        .sum();
    let cases: usize = corpus
        .case
        .iter()
        .map(|c| c.events.unwrap_or(c.statuses().len()))
        .sum();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        daemon.request_events().len(),
        3 * (setup + cases) + 3,
        "one event per request, in total"
    );
    let (ok, out) = daemon.verify_audit();
    assert!(ok, "{out}");
    // Memory is flat: after the first pass warms the allocator, two more passes add little.
    eprintln!("daemon RSS after each pass: {rss:?} KiB");
    let growth = rss[2].saturating_sub(rss[0]);
    assert!(
        growth < 16 * 1024,
        "RSS grew {growth} KiB over two passes ({rss:?} KiB)"
    );
}
