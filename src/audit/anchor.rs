//! The log against its anchor: does the audit log still hold the line the store says the last
//! mutation was audited at?
//!
//! Every mutation's transaction records, with the change, the sequence number and MAC of its
//! audit event (`store::AuditAnchor`). A log that ends before that sequence number lost its newest
//! lines (files deleted, the tail cut); a log whose line at that number has another MAC was
//! replaced. Neither can be told from the log alone, which is a valid chain either way. Startup
//! refuses such a log and `audit verify --config` fails on it.
//!
//! What the anchor cannot see: events after the last mutation (reads, refusals) cut from the
//! tail, since no transaction recorded them.

use std::fmt;
use std::io;
use std::path::Path;

use subtle::ConstantTimeEq;

use super::chain::AuditKeys;
use super::writer::log_files;

/// How the log falls short of its anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnchorGap {
    /// The log ends before the anchored sequence number (0: the log is empty or gone).
    Behind {
        /// The last sequence number in the log.
        log_ends_at: u64,
        /// The sequence number the store recorded.
        anchored: u64,
    },
    /// The log has no verifiable line at the anchored sequence number in the file that should
    /// hold it (the line was removed, or the file edited).
    Missing {
        /// The sequence number the store recorded.
        anchored: u64,
    },
    /// The log's line at the anchored sequence number is another line: the log was replaced.
    Replaced {
        /// The sequence number the store recorded.
        anchored: u64,
    },
}

impl fmt::Display for AnchorGap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Behind {
                log_ends_at,
                anchored,
            } => write!(
                f,
                "the audit log ends at sequence {log_ends_at}, but the store recorded a change audited at sequence {anchored}: events {}..={anchored} are missing (files deleted or the tail cut)",
                log_ends_at + 1
            ),
            Self::Missing { anchored } => write!(
                f,
                "the store recorded a change audited at sequence {anchored}, and the audit log holds no verifiable line with that number (lines removed or a file edited)"
            ),
            Self::Replaced { anchored } => write!(
                f,
                "the audit log's line at sequence {anchored} is not the one the store recorded with a change: the log was replaced"
            ),
        }
    }
}

/// Checks the log in `dir` (ending at `log_ends_at`) against the anchor `(seq, mac)`.
pub fn check(
    keys: &AuditKeys,
    dir: &Path,
    log_ends_at: u64,
    anchored: (u64, &str),
) -> io::Result<Result<(), AnchorGap>> {
    let (seq, mac) = anchored;
    if log_ends_at < seq {
        return Ok(Err(AnchorGap::Behind {
            log_ends_at,
            anchored: seq,
        }));
    }
    // The newest file whose first sequence number is at most `seq` holds it: after a failed write
    // a later file may restart below the previous file's end, and the later file is the chain.
    let holder = log_files(dir)?
        .into_iter()
        .filter(|p| first_seq(p).is_some_and(|first| first <= seq))
        .max_by_key(|p| first_seq(p));
    let Some(holder) = holder else {
        return Ok(Err(AnchorGap::Missing { anchored: seq }));
    };
    // Streamed a line at a time: a file is up to `max_file_bytes`, and reading it whole had set
    // the daemon's peak memory at startup.
    let mut reader = io::BufReader::with_capacity(64 * 1024, std::fs::File::open(&holder)?);
    let mut line = Vec::with_capacity(4096);
    loop {
        line.clear();
        if io::BufRead::read_until(&mut reader, b'\n', &mut line)? == 0 {
            break;
        }
        let Ok(fields) = keys.check_line(line.strip_suffix(b"\n").unwrap_or(&line)) else {
            continue;
        };
        if fields.seq == seq {
            let same = bool::from(fields.mac.as_bytes().ct_eq(mac.as_bytes()));
            return Ok(if same {
                Ok(())
            } else {
                Err(AnchorGap::Replaced { anchored: seq })
            });
        }
    }
    Ok(Err(AnchorGap::Missing { anchored: seq }))
}

/// The first sequence number of an audit file, from its name (`audit-<20 digits>-<ms>.jsonl`).
fn first_seq(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("audit-")?.get(..20)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::GENESIS;

    fn write_log(dir: &Path, keys: &AuditKeys, lines: u64) -> Vec<String> {
        let mut out = Vec::new();
        let mut prev = GENESIS.to_owned();
        let mut macs = Vec::new();
        for seq in 1..=lines {
            let open = format!("{{\"n\":{seq},\"metadata\":{{\"uid\":\"r{seq}\"");
            prev = keys.seal_line(open.as_bytes(), seq, &prev, &mut out);
            macs.push(prev.clone());
        }
        std::fs::write(
            dir.join("audit-00000000000000000001-000000000000001.jsonl"),
            out,
        )
        .unwrap();
        macs
    }

    #[test]
    fn the_anchor_is_found_or_the_gap_named() {
        let keys = AuditKeys::derive(&[7; 32]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let macs = write_log(dir.path(), &keys, 5);
        assert_eq!(check(&keys, dir.path(), 5, (3, &macs[2])).unwrap(), Ok(()));
        assert_eq!(
            check(&keys, dir.path(), 5, (7, "x")).unwrap(),
            Err(AnchorGap::Behind {
                log_ends_at: 5,
                anchored: 7
            })
        );
        assert_eq!(
            check(&keys, dir.path(), 5, (3, &macs[1])).unwrap(),
            Err(AnchorGap::Replaced { anchored: 3 })
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            check(&keys, empty.path(), 0, (1, &macs[0])).unwrap(),
            Err(AnchorGap::Behind { log_ends_at: 0, .. })
        ));
    }
}
