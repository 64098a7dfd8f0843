//! Verifying a chain of audit files: every line's MAC, every link, every sequence number.
//!
//! The first problem found ends the check and names the sequence number where the chain breaks:
//! an edited line (MAC mismatch), a deleted, inserted or reordered line (sequence or link
//! mismatch), a gap between files. Two situations are reported as warnings, not tampering, because
//! the writer produces them itself and the chain shows it:
//!
//! - a torn last line of a file: the process died in the middle of a write; the line was never
//!   acknowledged, and the next file continues the chain from the last complete line;
//! - an abandoned tail: a write failed, the file could not be truncated, and the next file continues
//!   from the last acknowledged line, which is still in the previous file.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::chain::{AuditKeys, GENESIS, LineError};

/// What is wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    /// A line whose MAC does not match its bytes (edited or forged).
    BadMac,
    /// A line that is not a sealed audit line.
    Malformed,
    /// The sequence number is not the next one: a line was deleted, inserted or reordered, or
    /// files are missing between two files.
    SequenceGap {
        /// The sequence number the chain needed.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// The line's `prev` is not the previous line's MAC.
    BrokenLink,
    /// Nothing to verify: no file, or no event in any (a deleted log must not pass).
    NoEvents,
    /// The chain does not begin where the retained log should: at sequence 1 (the genesis line),
    /// or where the operator said it begins (`--from-sequence`). The oldest files are missing.
    MissingStart {
        /// Where the log should begin.
        expected: u64,
        /// The first sequence number found.
        found: u64,
    },
}

/// The first problem in a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// The 1-based line number in the file.
    pub line: usize,
    /// The first bad sequence number: the first position the chain cannot vouch for (the line's own
    /// number for an edited line; the expected next number for a deleted, inserted, reordered or
    /// missing line).
    pub seq: u64,
    /// What is wrong.
    pub kind: ProblemKind,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.kind {
            ProblemKind::BadMac => "MAC mismatch (line edited or forged)".to_owned(),
            ProblemKind::Malformed => "not a sealed audit line".to_owned(),
            ProblemKind::SequenceGap { expected, found } => format!(
                "sequence {found} where {expected} was expected (line deleted, inserted or reordered, or a file is missing)"
            ),
            ProblemKind::BrokenLink => "prev does not match the previous line's MAC".to_owned(),
            ProblemKind::NoEvents => {
                "no audit event to verify (the log is empty or its files are missing)".to_owned()
            }
            ProblemKind::MissingStart { expected, found } => format!(
                "the log begins at sequence {found}, not {expected}: the oldest files are missing (if they were retired on purpose, say where the retained log begins with --from-sequence {found})"
            ),
        };
        write!(
            f,
            "first bad sequence number {}: {}:{}: {what}",
            self.seq,
            self.file.display(),
            self.line
        )
    }
}

/// The result of a verification.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Files read.
    pub files: usize,
    /// Lines that verified.
    pub events: u64,
    /// The first and last sequence numbers verified.
    pub range: Option<(u64, u64)>,
    /// Things a reviewer should know that are not tampering.
    pub warnings: Vec<String>,
    /// The first problem, if any.
    pub problem: Option<Problem>,
}

/// Where the verified log must begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// At the genesis line (sequence 1): nothing was ever retired.
    #[default]
    Genesis,
    /// At this sequence number: the operator retired the files before it and says so.
    Retained(u64),
}

/// Verifies `files` as one chain, in the order given, one file in memory at a time.
pub fn verify_files(keys: &AuditKeys, files: &[PathBuf], start: Start) -> std::io::Result<Report> {
    let mut verifier = Verifier::new(keys, start);
    for file in files {
        let content = std::fs::read(file)?;
        if !verifier.feed(file, &content) {
            break;
        }
    }
    Ok(verifier.finish(files.first()))
}

/// Verifies the contents of audit files (named for the report) as one chain, in the order given.
pub fn verify_contents(keys: &AuditKeys, files: &[(PathBuf, Vec<u8>)], start: Start) -> Report {
    let mut verifier = Verifier::new(keys, start);
    for (path, content) in files {
        if !verifier.feed(path, content) {
            break;
        }
    }
    verifier.finish(files.first().map(|(p, _)| p))
}

/// The state of a verification between files: the last line verified and the MACs of the
/// previous file (to recognise a file that continues from an abandoned tail).
struct Verifier<'k> {
    keys: &'k AuditKeys,
    start: Start,
    report: Report,
    last: Option<(u64, String)>,
    previous_file: HashMap<u64, String>,
}

impl<'k> Verifier<'k> {
    fn new(keys: &'k AuditKeys, start: Start) -> Self {
        Self {
            keys,
            start,
            report: Report::default(),
            last: None,
            previous_file: HashMap::new(),
        }
    }

    /// Verifies one more file; `false` once a problem ends the verification.
    ///
    /// Long on purpose: the line-by-line state machine of the chain (sequence, MAC, file links) reads
    /// best as one loop.
    fn feed(&mut self, path: &Path, content: &[u8]) -> bool {
        let report = &mut self.report;
        let file_index = report.files;
        report.files += 1;
        let mut pieces: Vec<&[u8]> = content.split(|&b| b == b'\n').collect();
        let tail = pieces.pop().unwrap_or_default();
        let mut this_file = HashMap::new();
        for (line_index, line) in pieces.iter().enumerate() {
            let line_no = line_index + 1;
            let expected = self.last.as_ref().map_or(1, |(s, _)| s + 1);
            let problem = |seq, kind| Problem {
                file: path.to_path_buf(),
                line: line_no,
                seq,
                kind,
            };
            let fields = match self.keys.check_line(line) {
                Ok(f) => f,
                Err(LineError::BadMac { seq }) => {
                    report.problem = Some(problem(seq, ProblemKind::BadMac));
                    return false;
                }
                Err(LineError::Malformed) => {
                    report.problem = Some(problem(expected, ProblemKind::Malformed));
                    return false;
                }
            };
            match &self.last {
                None => {
                    let expected = match self.start {
                        Start::Genesis => 1,
                        Start::Retained(n) => n,
                    };
                    let genesis_ok = self.start != Start::Genesis || fields.prev == GENESIS;
                    if fields.seq != expected || !genesis_ok {
                        let kind = ProblemKind::MissingStart {
                            expected,
                            found: fields.seq,
                        };
                        report.problem = Some(problem(expected, kind));
                        return false;
                    }
                    if let Start::Retained(n) = self.start {
                        report.warnings.push(format!(
                            "the retained log begins at sequence {n} in {}, as stated (earlier files not checked)",
                            path.display()
                        ));
                    }
                }
                Some((last_seq, last_mac)) => {
                    let follows = fields.seq == last_seq + 1 && &fields.prev == last_mac;
                    let continues_earlier = line_index == 0
                        && file_index > 0
                        && fields.seq >= 1
                        && self.previous_file.get(&(fields.seq - 1)) == Some(&fields.prev);
                    if continues_earlier && !follows {
                        report.warnings.push(format!(
                            "{} continues the chain from sequence {}: the {} line(s) after it in the previous file were written but never acknowledged (a failed write)",
                            path.display(),
                            fields.seq - 1,
                            last_seq - (fields.seq - 1)
                        ));
                    } else if fields.seq != last_seq + 1 {
                        let kind = ProblemKind::SequenceGap {
                            expected: last_seq + 1,
                            found: fields.seq,
                        };
                        report.problem = Some(problem(last_seq + 1, kind));
                        return false;
                    } else if !follows {
                        report.problem = Some(problem(fields.seq, ProblemKind::BrokenLink));
                        return false;
                    }
                }
            }
            report.events += 1;
            report.range = Some((report.range.map_or(fields.seq, |(a, _)| a), fields.seq));
            this_file.insert(fields.seq, fields.mac.clone());
            self.last = Some((fields.seq, fields.mac));
        }
        if !tail.is_empty() {
            report.warnings.push(format!(
                "{} ends with a torn line of {} bytes (the process stopped in the middle of a write; that event was never acknowledged)",
                path.display(),
                tail.len()
            ));
        }
        self.previous_file = this_file;
        true
    }

    fn finish(mut self, first: Option<&PathBuf>) -> Report {
        if self.report.events == 0 && self.report.problem.is_none() {
            // Verifying nothing proves nothing: a deleted or emptied log fails.
            self.report.problem = Some(Problem {
                file: first.cloned().unwrap_or_default(),
                line: 0,
                seq: 1,
                kind: ProblemKind::NoEvents,
            });
        }
        self.report
    }
}

/// Verifies every audit file in `dir`, in chain order.
pub fn verify_dir(keys: &AuditKeys, dir: &Path, start: Start) -> std::io::Result<Report> {
    verify_files(keys, &super::writer::log_files(dir)?, start)
}
