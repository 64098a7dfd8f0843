//! Signed checkpoints: evidence a reviewer can check with a public key alone.
//!
//! The per-line MAC proves the log to whoever holds the chain key, and that holder could also
//! forge it. So the writer also signs, at least every second while events flow, at every rotation
//! and at every clean shutdown, an `audit:checkpoint` event: an Ed25519 signature over
//! (`from_sequence`, `through_sequence`, SHA-256 of the exact bytes of those lines). A segment
//! starts at the previous checkpoint's own line, so each checkpoint also vouches for the one before
//! it, as Certificate Transparency's signed tree heads and journald's sealing vouch for what came
//! before them. The public verifier ([`verify_public`]) recomputes every digest from the file bytes
//! and checks every signature and sequence number; events after the last checkpoint are reported
//! as unsealed, not as verified.
//!
//! What a public verification cannot see: lines after the last checkpoint (not yet sealed), and
//! files the writer abandoned after a failed write (a later file restarting below the previous
//! file's end): the chain key's `audit verify` handles that case.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::chain::{AuditKeys, checkpoint_message, checkpoint_signature_valid};
use super::event::{self, Activity, Checkpoint, Facts, Reason};

/// How often the writer signs while events flow.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// The operation name of a checkpoint event.
pub const CHECKPOINT_OPERATION: &str = "audit:checkpoint";
const DIGEST_PREFIX: &str = "sha256:";
const SIGNATURE_PREFIX: &str = "ed25519:";

/// The running digest of the lines since the last checkpoint.
#[derive(Clone)]
pub struct Segment {
    from: Option<u64>,
    /// `sha2`'s, for the CPU's SHA extensions: every line passes through it.
    hasher: Sha256,
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment").field("from", &self.from).finish()
    }
}

impl Default for Segment {
    fn default() -> Self {
        Self {
            from: None,
            hasher: Sha256::new(),
        }
    }
}

impl Segment {
    /// Adds one whole line (with its newline) at sequence `seq`.
    pub fn add(&mut self, seq: u64, line: &[u8]) {
        self.from.get_or_insert(seq);
        self.hasher.update(line);
    }

    /// The open line of the checkpoint event that signs this segment through `through`.
    pub fn checkpoint_line(&self, keys: &AuditKeys, through: u64) -> Vec<u8> {
        let digest: [u8; 32] = self.hasher.clone().finalize().into();
        let from = self.from.unwrap_or(through);
        let signature = keys.sign_checkpoint(&checkpoint_message(from, through, digest.as_ref()));
        let mut facts = Facts::system(CHECKPOINT_OPERATION, Activity::Update);
        facts.reason = Reason::Ok;
        facts.checkpoint = Some(Checkpoint {
            from_sequence: from,
            through_sequence: through,
            digest: format!("{DIGEST_PREFIX}{}", hex::encode(digest)),
            signature: format!("{SIGNATURE_PREFIX}{}", hex::encode(signature)),
        });
        event::encode(&facts, 200, std::time::Duration::ZERO)
    }
}

/// What a line says of itself, read without any key.
#[derive(Deserialize)]
struct PublicLine {
    metadata: PublicMetadata,
    #[serde(default)]
    unmapped: Option<PublicUnmapped>,
}

#[derive(Deserialize)]
struct PublicMetadata {
    sequence: u64,
}

#[derive(Deserialize)]
struct PublicUnmapped {
    #[serde(default)]
    checkpoint: Option<SignedRange>,
}

#[derive(Deserialize)]
struct SignedRange {
    from_sequence: u64,
    through_sequence: u64,
    digest: String,
    signature: String,
}

/// Finds the segment the writer continues after a restart: from the newest checkpoint line of
/// the log (itself included) to its end, or the whole log if it has none. `files` are in chain
/// order; only complete lines count (a torn last line was never acknowledged).
///
/// Streams the files a line at a time: a log file is up to `max_file_bytes` (64 MiB by default),
/// and reading it whole had set the daemon's peak memory at startup.
pub fn recover_segment(files: &[PathBuf]) -> std::io::Result<Segment> {
    let mut from = (0, 0);
    for (i, path) in files.iter().enumerate().rev() {
        let mut last = None;
        for_each_complete_line(path, 0, |offset, line| {
            if is_checkpoint(line) {
                last = Some(offset);
            }
        })?;
        if let Some(offset) = last {
            from = (i, offset);
            break;
        }
    }
    let mut segment = Segment::default();
    for (i, path) in files.iter().enumerate().skip(from.0) {
        let start = if i == from.0 { from.1 } else { 0 };
        for_each_complete_line(path, start, |_, line| add_parsed(&mut segment, line))?;
    }
    Ok(segment)
}

/// Calls `f` with the byte offset and the bytes (newline included) of every complete line of
/// `path` from `start` on; a last line without its newline (torn) is not one.
fn for_each_complete_line(
    path: &std::path::Path,
    start: u64,
    mut f: impl FnMut(u64, &[u8]),
) -> std::io::Result<()> {
    use std::io::{BufRead, Seek};
    let mut file = std::fs::File::open(path)?;
    file.seek(std::io::SeekFrom::Start(start))?;
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
    let mut line = Vec::with_capacity(4096);
    let mut offset = start;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || !line.ends_with(b"\n") {
            return Ok(());
        }
        f(offset, &line);
        offset += n as u64;
    }
}

fn add_parsed(segment: &mut Segment, line: &[u8]) {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    if let Ok(parsed) = serde_json::from_slice::<PublicLine>(body) {
        segment.add(parsed.metadata.sequence, line);
    }
}

fn is_checkpoint(line: &[u8]) -> bool {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    // Cheap filter first: most lines are not checkpoints.
    body.windows(CHECKPOINT_OPERATION.len())
        .any(|w| w == CHECKPOINT_OPERATION.as_bytes())
        && serde_json::from_slice::<PublicLine>(body)
            .ok()
            .and_then(|l| l.unmapped)
            .and_then(|u| u.checkpoint)
            .is_some()
}

/// The outcome of a public verification.
#[derive(Debug, Clone, Default)]
pub struct PublicReport {
    /// Lines read.
    pub lines: u64,
    /// Checkpoints whose signature and digest verified.
    pub checkpoints: u64,
    /// Every line up to this sequence number is sealed by a verified checkpoint.
    pub sealed_through: Option<u64>,
    /// The sequence number of the last verified checkpoint's own line: lines after it are
    /// unsealed.
    pub last_checkpoint: Option<u64>,
    /// The last sequence number read.
    pub last_seq: Option<u64>,
    /// Things a reviewer should know that are not tampering.
    pub warnings: Vec<String>,
    /// The first problem, if any.
    pub problem: Option<String>,
}

/// Verifies `files` (in chain order) with the checkpoint public key alone.
///
/// Long on purpose: one pass over the lines, a small state machine (segment digest, checkpoint check,
/// warnings) whose steps only make sense together.
pub fn verify_public(public: &[u8], files: &[PathBuf]) -> std::io::Result<PublicReport> {
    let mut report = PublicReport::default();
    // Two running digests: from the first line given (for a checkpoint that covers the whole log)
    // and from the last verified checkpoint's line.
    let mut since_start = Segment::default();
    let mut since_checkpoint: Option<(u64, Segment)> = None;
    for path in files {
        let content = std::fs::read(path)?;
        let complete = match content.iter().rposition(|&b| b == b'\n') {
            Some(end) => &content[..=end],
            None => &[][..],
        };
        if complete.len() < content.len() {
            report.warnings.push(format!(
                "{} ends with a torn line (never acknowledged)",
                path.display()
            ));
        }
        for (index, line) in complete.split_inclusive(|&b| b == b'\n').enumerate() {
            let at = || format!("{}:{}", path.display(), index + 1);
            let body = line.strip_suffix(b"\n").unwrap_or(line);
            let Ok(parsed) = serde_json::from_slice::<PublicLine>(body) else {
                report.problem = Some(format!("{}: not an audit line", at()));
                return Ok(report);
            };
            if let Some(last) = report.last_seq
                && parsed.metadata.sequence != last + 1
            {
                report.problem = Some(format!(
                    "{}: sequence {} where {} was expected (a line deleted, inserted or reordered, or a file missing)",
                    at(),
                    parsed.metadata.sequence,
                    last + 1
                ));
                return Ok(report);
            }
            report.lines += 1;
            if let Some(range) = parsed.unmapped.and_then(|u| u.checkpoint) {
                let covering = if since_start.from == Some(range.from_sequence) {
                    Some(&since_start)
                } else {
                    since_checkpoint
                        .as_ref()
                        .filter(|(from, _)| *from == range.from_sequence)
                        .map(|(_, segment)| segment)
                };
                match check_range(public, &range, covering, report.last_seq) {
                    Ok(true) => {
                        report.checkpoints += 1;
                        report.sealed_through = Some(range.through_sequence);
                        report.last_checkpoint = Some(parsed.metadata.sequence);
                    }
                    Ok(false) => report.warnings.push(format!(
                        "{}: the checkpoint at sequence {} covers from sequence {}, before the lines given; sealing starts after it",
                        at(),
                        parsed.metadata.sequence,
                        range.from_sequence
                    )),
                    Err(why) => {
                        report.problem = Some(format!(
                            "{}: checkpoint at sequence {}: {why}",
                            at(),
                            parsed.metadata.sequence
                        ));
                        return Ok(report);
                    }
                }
                let mut next = Segment::default();
                next.add(parsed.metadata.sequence, line);
                since_checkpoint = Some((parsed.metadata.sequence, next));
            } else if let Some((_, segment)) = since_checkpoint.as_mut() {
                segment.add(parsed.metadata.sequence, line);
            }
            since_start.add(parsed.metadata.sequence, line);
            report.last_seq = Some(parsed.metadata.sequence);
        }
    }
    if report.lines == 0 {
        report.problem =
            Some("no audit line to verify (the log is empty or its files are missing)".into());
    } else if report.checkpoints == 0 && report.problem.is_none() {
        report.problem = Some("no verifiable checkpoint: nothing in these files is sealed".into());
    }
    Ok(report)
}

/// Checks one checkpoint: `Ok(false)` if its range began before what was read (the signature
/// is then all that can be checked), an error naming what does not match otherwise.
fn check_range(
    public: &[u8],
    range: &SignedRange,
    covering: Option<&Segment>,
    last_seq: Option<u64>,
) -> Result<bool, String> {
    let digest = range
        .digest
        .strip_prefix(DIGEST_PREFIX)
        .and_then(|h| hex::decode(h).ok())
        .ok_or("malformed digest")?;
    let signature = range
        .signature
        .strip_prefix(SIGNATURE_PREFIX)
        .and_then(|h| hex::decode(h).ok())
        .ok_or("malformed signature")?;
    let message = checkpoint_message(range.from_sequence, range.through_sequence, &digest);
    if !checkpoint_signature_valid(public, &message, &signature) {
        return Err(
            "the signature does not verify with this public key (forged, or another log's key)"
                .into(),
        );
    }
    if last_seq != Some(range.through_sequence) {
        return Err(format!(
            "it seals through sequence {} but follows sequence {}",
            range.through_sequence,
            last_seq.map_or_else(|| "nothing".to_owned(), |s| s.to_string())
        ));
    }
    let Some(segment) = covering else {
        return Ok(false);
    };
    let computed: [u8; 32] = segment.hasher.clone().finalize().into();
    if computed.as_slice() != digest.as_slice() {
        return Err(format!(
            "the lines {}..={} are not the ones it signed (edited, inserted, removed or reordered)",
            range.from_sequence, range.through_sequence
        ));
    }
    Ok(true)
}

/// `ed25519:<hex>`: how `audit public-key` prints the key and `--public-key` reads it.
pub fn format_public_key(key: &[u8]) -> String {
    format!("{SIGNATURE_PREFIX}{}", hex::encode(key))
}

/// Reads a public key file written by `audit public-key`.
pub fn read_public_key(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.trim()
        .strip_prefix(SIGNATURE_PREFIX)
        .and_then(|h| hex::decode(h).ok())
        .filter(|k| k.len() == super::chain::PUBLIC_KEY_LEN)
        .ok_or_else(|| {
            format!(
                "{}: not an audit public key (expected ed25519:<64 hex digits>)",
                path.display()
            )
        })
}
