//! Reviewer tooling: `metapass audit show` and `metapass audit summary`.
//!
//! Both read the log as it is on disk (complete lines only; a torn last line is skipped and
//! reported) and never need a key: verifying the chain is `audit verify`'s job.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Which events to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only events about this instance (target or calling instance).
    pub instance: Option<String>,
    /// Only events where this project is the caller's or the target's.
    pub project: Option<String>,
    /// Only events with this outcome (`success`, `denied`, `failure`, `error`).
    pub outcome: Option<String>,
    /// Only events at or after this time.
    pub since: Option<OffsetDateTime>,
}

/// Parses `--since`: an RFC 3339 time, or a duration before `now` such as `15m`, `2h`, `7days`.
pub fn parse_since(text: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        format!("--since {text:?} is neither an RFC 3339 time (2026-11-23T10:00:00Z) nor a duration (15m, 2h, 7days)")
    })?;
    let ago =
        time::Duration::try_from(ago).map_err(|_| format!("--since {text:?} is too long ago"))?;
    Ok(now - ago)
}

/// The events of `files` (complete lines only), and warnings about lines that could not be read.
pub fn read_events(files: &[PathBuf]) -> std::io::Result<(Vec<Value>, Vec<String>)> {
    let mut events = Vec::new();
    let mut warnings = Vec::new();
    for file in files {
        let content = std::fs::read(file)?;
        let mut pieces: Vec<&[u8]> = content.split(|&b| b == b'\n').collect();
        let tail = pieces.pop().unwrap_or_default();
        if !tail.is_empty() {
            warnings.push(format!(
                "{}: torn last line skipped ({} bytes)",
                file.display(),
                tail.len()
            ));
        }
        for (i, line) in pieces.iter().enumerate() {
            match serde_json::from_slice(line) {
                Ok(v) => events.push(v),
                Err(_) => warnings.push(format!("{}:{}: not JSON, skipped", file.display(), i + 1)),
            }
        }
    }
    Ok((events, warnings))
}

/// The audit files of a log directory, in chain order.
pub fn files_of(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    super::writer::log_files(dir)
}

fn text<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    path.iter().fold(v, |v, k| &v[*k]).as_str().unwrap_or("")
}

impl Filter {
    /// Whether `event` passes the filter.
    pub fn matches(&self, event: &Value) -> bool {
        if let Some(instance) = &self.instance {
            let target = event["resources"][0]["uid"].as_str().unwrap_or("");
            let caller = text(event, &["actor", "user", "uid"]);
            if target != instance && caller != instance {
                return false;
            }
        }
        if let Some(project) = &self.project {
            let caller = text(event, &["actor", "user", "account", "uid"]);
            let owner = event["resources"][0]["owner"]["account"]["uid"]
                .as_str()
                .unwrap_or("");
            if caller != project && owner != project {
                return false;
            }
        }
        if let Some(outcome) = &self.outcome
            && text(event, &["unmapped", "outcome"]) != outcome
        {
            return false;
        }
        if let Some(since) = self.since {
            let at = event["time"].as_i64().unwrap_or(0);
            if i128::from(at) < since.unix_timestamp_nanos() / 1_000_000 {
                return false;
            }
        }
        true
    }
}

fn caller_of(event: &Value) -> String {
    let user = &event["actor"]["user"];
    match text(event, &["unmapped", "caller_kind"]) {
        "instance" => format!("instance {}", short(user["uid"].as_str().unwrap_or("?"))),
        "owner" | "admin" => format!(
            "{} ({})",
            user["name"].as_str().unwrap_or("token"),
            user["account"]["uid"].as_str().unwrap_or("?")
        ),
        _ => "anonymous".to_owned(),
    }
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn source_of(event: &Value) -> String {
    let ip = text(event, &["src_endpoint", "ip"]);
    match event["http_request"]["x_forwarded_for"][0].as_str() {
        Some(forwarded) => format!("{forwarded} via {ip}"),
        None => ip.to_owned(),
    }
}

/// A compact table of the events that pass `filter`, one per line.
pub fn show(events: &[Value], filter: &Filter) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:>7} {:<8} {:>4} {:<18} {:<28} {:<9} {:<24} REASON",
        "TIME", "SEQ", "OUTCOME", "CODE", "OPERATION", "CALLER", "INSTANCE", "SOURCE"
    );
    let mut shown = 0usize;
    for event in events.iter().filter(|e| filter.matches(e)) {
        shown += 1;
        let time = text(event, &["time_dt"]);
        let _ = writeln!(
            out,
            "{:<24} {:>7} {:<8} {:>4} {:<18} {:<28} {:<9} {:<24} {}",
            time.get(..23).unwrap_or(time),
            event["metadata"]["sequence"].as_u64().unwrap_or(0),
            text(event, &["unmapped", "outcome"]),
            text(event, &["status_code"]),
            text(event, &["api", "operation"]),
            caller_of(event),
            short(event["resources"][0]["uid"].as_str().unwrap_or("-")),
            source_of(event),
            text(event, &["unmapped", "reason"]),
        );
    }
    let _ = writeln!(out, "{shown} of {} events", events.len());
    out
}

/// Counts by operation and outcome, by reason, and the sources refused most often.
pub fn summary(events: &[Value], filter: &Filter) -> String {
    let mut by_operation: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    let mut refused_sources: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0usize;
    for event in events.iter().filter(|e| filter.matches(e)) {
        total += 1;
        let outcome = text(event, &["unmapped", "outcome"]).to_owned();
        *by_operation
            .entry((
                text(event, &["api", "operation"]).to_owned(),
                outcome.clone(),
            ))
            .or_default() += 1;
        *by_reason
            .entry(text(event, &["unmapped", "reason"]).to_owned())
            .or_default() += 1;
        if outcome == "denied" || outcome == "failure" {
            *refused_sources.entry(source_of(event)).or_default() += 1;
        }
    }
    let mut out = format!("{total} events\n\nby operation and outcome:\n");
    for ((operation, outcome), n) in &by_operation {
        let _ = writeln!(out, "  {n:>8}  {operation:<20} {outcome}");
    }
    out.push_str("\nby reason:\n");
    let mut reasons: Vec<_> = by_reason.into_iter().collect();
    reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (reason, n) in reasons {
        let _ = writeln!(out, "  {n:>8}  {reason}");
    }
    out.push_str("\ntop refused sources (denied or failed):\n");
    let mut sources: Vec<_> = refused_sources.into_iter().collect();
    sources.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    if sources.is_empty() {
        out.push_str("  none\n");
    }
    for (source, n) in sources.into_iter().take(10) {
        let _ = writeln!(out, "  {n:>8}  {source}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(outcome: &str, instance: &str, project: &str, ip: &str, time: i64) -> Value {
        json!({
            "time": time, "time_dt": "2026-11-23T10:00:00.000Z", "metadata": {"sequence": 1}, "status_code": "200",
            "api": {"operation": "password:get"},
            "actor": {"user": {"name": "t", "account": {"uid": project}}},
            "resources": [{"uid": instance, "owner": {"account": {"uid": project}}}],
            "src_endpoint": {"ip": ip},
            "http_request": {},
            "unmapped": {"outcome": outcome, "reason": if outcome == "success" { "ok" } else { "not_owner" }, "caller_kind": "owner"}
        })
    }

    #[test]
    fn filters_and_summaries() {
        let events = vec![
            event("success", "i-1", "p-a", "10.0.0.1", 1_000),
            event("denied", "i-1", "p-b", "10.0.0.9", 2_000),
            event("denied", "i-2", "p-b", "10.0.0.9", 3_000),
        ];
        let f = |instance: Option<&str>,
                 project: Option<&str>,
                 outcome: Option<&str>,
                 since_ms: Option<i64>| Filter {
            instance: instance.map(str::to_owned),
            project: project.map(str::to_owned),
            outcome: outcome.map(str::to_owned),
            since: since_ms.map(|ms| {
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap()
            }),
        };
        let count = |filter: Filter| events.iter().filter(|e| filter.matches(e)).count();
        assert_eq!(count(f(None, None, None, None)), 3);
        assert_eq!(count(f(Some("i-1"), None, None, None)), 2);
        assert_eq!(count(f(None, Some("p-b"), None, None)), 2);
        assert_eq!(count(f(None, None, Some("denied"), None)), 2);
        assert_eq!(count(f(None, None, None, Some(2_000))), 2);
        let table = show(&events, &f(None, None, Some("denied"), None));
        assert!(table.ends_with("2 of 3 events\n"), "{table}");
        let s = summary(&events, &Filter::default());
        assert!(
            s.contains("2  not_owner") && s.contains("2  10.0.0.9"),
            "{s}"
        );
    }

    #[test]
    fn since_accepts_times_and_durations() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        assert_eq!(
            parse_since("2h", now).unwrap(),
            now - time::Duration::hours(2)
        );
        assert_eq!(
            parse_since("15m", now).unwrap(),
            now - time::Duration::minutes(15)
        );
        assert_eq!(
            parse_since("2026-11-23T10:00:00Z", now)
                .unwrap()
                .unix_timestamp(),
            1_795_428_000
        );
        assert!(parse_since("yesterday-ish", now).is_err());
    }
}
