//! `metapass audit ...`: the reviewer's tools (verify, reconcile, public-key, hash, show, summary).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use secrecy::ExposeSecret;

use super::{audit_keys, load_for_tool, read_store};
use crate::audit::{AuditKeys, review, verify};
use crate::config::{Config, Overrides};

/// Where the audit key comes from: the daemon's config, or the audit key file alone (a reviewer
/// needs no other secret).
#[derive(clap::Args)]
#[group(required = false, multiple = false)]
pub(crate) struct KeySource {
    /// The daemon configuration (its [audit] key_file is used).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// The audit key file itself.
    #[arg(long)]
    pub(crate) audit_key: Option<PathBuf>,
}

/// Where the audit log is: an explicit directory, or the one the daemon configuration names.
#[derive(clap::Args)]
pub(crate) struct LogLocation {
    /// The audit log directory.
    #[arg(long, conflicts_with_all = ["config", "data_dir"])]
    pub(crate) dir: Option<PathBuf>,
    /// The daemon configuration (its audit directory is used).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// The data directory, if not the configured one.
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub(crate) struct EventFilter {
    /// Only events about this instance (as target or caller).
    #[arg(long)]
    pub(crate) instance: Option<String>,
    /// Only events where this project is the caller's or the target's.
    #[arg(long)]
    pub(crate) project: Option<String>,
    /// Only events with this outcome.
    #[arg(long, value_parser = ["success", "denied", "failure", "error"])]
    pub(crate) outcome: Option<String>,
    /// Only events since an RFC 3339 time or a duration ago (15m, 2h, 7days).
    #[arg(long)]
    pub(crate) since: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// Verify the chain of audit files (all files of the log if none are given).
    Verify {
        #[command(flatten)]
        key: KeySource,
        /// Verify with the checkpoint public key alone (from `audit public-key`): no secret
        /// needed; events after the last checkpoint are reported as unsealed.
        #[arg(long, conflicts_with_all = ["config", "audit_key"])]
        public_key: Option<PathBuf>,
        /// The audit log directory (default: the configured one).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The data directory, if not the configured one.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The sequence number the retained log begins at, when older files were retired on
        /// purpose (without it, the log must begin at sequence 1).
        #[arg(long, value_name = "SEQ")]
        from_sequence: Option<u64>,
        /// Audit files to verify, in chain order.
        files: Vec<PathBuf>,
    },
    /// Compare the store with what the audit log says each instance's state is (registered
    /// project, password set or not, record version and key): exit 0 when they agree, 1 naming
    /// every instance that differs (rolled back, planted, moved or deleted records).
    Reconcile {
        /// The daemon configuration (its store, audit log and audit key).
        #[arg(long)]
        config: PathBuf,
        /// The data directory, if not the configured one.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Print the public key that verifies the log's signed checkpoints (`ed25519:<hex>`), to
    /// hand to reviewers: `audit verify --public-key FILE` needs nothing else.
    PublicKey {
        #[command(flatten)]
        key: KeySource,
    },
    /// Print the keyed fingerprint of a value read from standard input (one line; a token or a
    /// password blob: never on the command line, where every local user can read it), to look
    /// for it in the log.
    Hash {
        #[command(flatten)]
        key: KeySource,
    },
    /// Print matching events as a compact table.
    Show {
        #[command(flatten)]
        log: LogLocation,
        #[command(flatten)]
        filter: EventFilter,
    },
    /// Count events by operation, outcome and reason, and list the sources refused most.
    Summary {
        #[command(flatten)]
        log: LogLocation,
        #[command(flatten)]
        filter: EventFilter,
    },
}

/// The audit keys from a config or an audit key file.
pub(crate) fn keys_from(
    source: &KeySource,
    data_dir: Option<PathBuf>,
) -> Result<(AuditKeys, Option<PathBuf>), String> {
    match (&source.config, &source.audit_key) {
        (Some(config), _) => {
            let config = load_for_tool(config, data_dir)?;
            Ok((audit_keys(&config)?, Some(config.audit.dir.clone())))
        }
        (None, Some(file)) => {
            let secret = crate::config::load_audit_secret(file).map_err(|e| e.to_string())?;
            let keys = AuditKeys::derive(secret.expose_secret()).map_err(|e| e.to_string())?;
            Ok((keys, None))
        }
        (None, None) => Err("give --config or --audit-key".into()),
    }
}

/// `audit reconcile`: the whole log verified (chain from sequence 1, anchor), replayed, and
/// compared with the store's registry.
pub(crate) fn reconcile(
    config_path: &std::path::Path,
    data_dir: Option<PathBuf>,
) -> Result<ExitCode, String> {
    use crate::audit::{anchor, reconcile};
    use crate::store::Store;
    let config = load_for_tool(config_path, data_dir.clone())?;
    let keys = audit_keys(&config)?;
    let dir = config.audit.dir.clone();
    let report = verify::verify_dir(&keys, &dir, verify::Start::Genesis)
        .map_err(|e| format!("reading the audit log: {e}"))?;
    if let Some(problem) = &report.problem {
        println!(
            "FAILED: the audit log does not verify, so it cannot vouch for the store: {problem}"
        );
        return Ok(ExitCode::from(1));
    }
    if let Some(stored) = stored_anchor(config_path, data_dir)? {
        let ends_at = report.range.map_or(0, |(_, last)| last);
        if let Err(gap) = anchor::check(&keys, &dir, ends_at, (stored.seq, &stored.mac))
            .map_err(|e| format!("reading the audit log: {e}"))?
        {
            println!("FAILED: the audit log is behind the store: {gap}");
            return Ok(ExitCode::from(1));
        }
    }
    let files = review::files_of(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (events, _) =
        review::read_events(&files).map_err(|e| format!("reading the audit log: {e}"))?;
    let expected = reconcile::replay(&events);
    let rows = read_store(&config, async |store| {
        store
            .inventory()
            .await
            .map_err(|e| format!("reading the store: {e}"))
    })?;
    let instances = rows.len();
    let differences = reconcile::compare(expected, rows);
    for difference in &differences {
        println!("DIFFERS {difference}");
    }
    if differences.is_empty() {
        println!(
            "OK: the store's {instances} instances agree with the {} events of the audit log",
            report.events
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "FAILED: {} instances differ from what the audit log says",
            differences.len()
        );
        Ok(ExitCode::from(1))
    }
}

/// `audit verify --public-key`: checkpoints only, no secret.
pub(crate) fn verify_public(
    public_key: &std::path::Path,
    dir: Option<PathBuf>,
    files: Vec<PathBuf>,
) -> Result<ExitCode, String> {
    use crate::audit::checkpoint;
    let key = checkpoint::read_public_key(public_key)?;
    let files = if files.is_empty() {
        let dir = dir.ok_or("give --dir or the files to verify")?;
        review::files_of(&dir).map_err(|e| format!("{}: {e}", dir.display()))?
    } else {
        files
    };
    let report = checkpoint::verify_public(&key, &files)
        .map_err(|e| format!("reading the audit log: {e}"))?;
    for warning in &report.warnings {
        println!("warning: {warning}");
    }
    if let Some(problem) = &report.problem {
        println!(
            "FAILED after {} lines ({} checkpoints verified): {problem}",
            report.lines, report.checkpoints
        );
        return Ok(ExitCode::from(1));
    }
    let sealed = report.sealed_through.unwrap_or(0);
    let last = report.last_seq.unwrap_or(0);
    let checkpoint = report.last_checkpoint.unwrap_or(0);
    println!(
        "OK: {} lines in {} files, {} checkpoints verified with the public key; sealed through sequence {sealed}",
        report.lines,
        files.len(),
        report.checkpoints
    );
    if last > checkpoint {
        println!(
            "unsealed: sequence {}..={last} comes after the last checkpoint (not verified)",
            checkpoint + 1
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The chain head the configured store recorded with its last change, for `audit verify
/// --config`. A SQLite file that does not exist is not created: there is no anchor then.
pub(crate) fn stored_anchor(
    config: &std::path::Path,
    data_dir: Option<PathBuf>,
) -> Result<Option<crate::store::AuditAnchor>, String> {
    use crate::store::Store;
    let config = load_for_tool(config, data_dir)?;
    if let crate::config::StoreConfig::Sqlite { path } = &config.store
        && !path.exists()
    {
        return Ok(None);
    }
    let writer =
        crate::audit::writer::writer_id(config.audit.writer_id.as_deref(), &config.audit.dir);
    read_store(&config, async |store| {
        store
            .audit_anchor(&writer)
            .await
            .map_err(|e| format!("reading the audit anchor: {e}"))
    })
}

/// The audit directory named by `--dir`, or by the configuration.
pub(crate) fn log_dir(log: &LogLocation) -> Result<PathBuf, String> {
    match (&log.dir, &log.config) {
        (Some(dir), _) => Ok(dir.clone()),
        (None, Some(config)) => {
            let overrides = Overrides {
                listen: None,
                data_dir: log.data_dir.clone(),
            };
            Ok(Config::load(config, &overrides)
                .map_err(|e| e.to_string())?
                .audit
                .dir)
        }
        (None, None) => Err("give --dir or --config".into()),
    }
}

pub(crate) fn filter_from(f: EventFilter) -> Result<review::Filter, String> {
    let since = match &f.since {
        Some(text) => Some(review::parse_since(text, crate::clock::wall_now())?),
        None => None,
    };
    Ok(review::Filter {
        instance: f.instance,
        project: f.project,
        outcome: f.outcome,
        since,
    })
}

pub(crate) fn read_log(log: &LogLocation) -> Result<Vec<serde_json::Value>, String> {
    let dir = log_dir(log)?;
    let files = review::files_of(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (events, warnings) =
        review::read_events(&files).map_err(|e| format!("reading the audit log: {e}"))?;
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
    Ok(events)
}

pub(crate) fn run(command: AuditCommand) -> Result<ExitCode, String> {
    match command {
        AuditCommand::Verify {
            public_key: Some(public_key),
            dir,
            files,
            ..
        } => verify_public(&public_key, dir, files),
        AuditCommand::Reconcile { config, data_dir } => reconcile(&config, data_dir),
        AuditCommand::PublicKey { key } => {
            let (keys, _) = keys_from(&key, None)?;
            println!(
                "{}",
                crate::audit::checkpoint::format_public_key(&keys.checkpoint_public_key())
            );
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify {
            key,
            dir,
            data_dir,
            from_sequence,
            files,
            public_key: None,
        } => verify_with_key(&key, dir, data_dir, from_sequence, &files),
        AuditCommand::Hash { key } => {
            let (keys, _) = keys_from(&key, None)?;
            let mut value = zeroize::Zeroizing::new(String::new());
            std::io::stdin()
                .read_line(&mut value)
                .map_err(|e| format!("reading the value from standard input: {e}"))?;
            let value = value.strip_suffix('\n').unwrap_or(&value);
            let value = value.strip_suffix('\r').unwrap_or(value);
            if value.is_empty() {
                return Err("give the value to fingerprint on standard input (one line)".into());
            }
            println!("{}", keys.fingerprint(value.as_bytes()));
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Show { log, filter } => {
            let events = read_log(&log)?;
            print!("{}", review::show(&events, &filter_from(filter)?));
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Summary { log, filter } => {
            let events = read_log(&log)?;
            print!("{}", review::summary(&events, &filter_from(filter)?));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `audit verify` with the audit key: the chain of every line, and with `--config` and the whole
/// log, the store's anchor too.
fn verify_with_key(
    key: &KeySource,
    dir: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    from_sequence: Option<u64>,
    files: &[PathBuf],
) -> Result<ExitCode, String> {
    let anchor = match &key.config {
        Some(config) if files.is_empty() && dir.is_none() => {
            stored_anchor(config, data_dir.clone())?
        }
        _ => None,
    };
    let (keys, configured_dir) = keys_from(key, data_dir)?;
    let start = from_sequence.map_or(verify::Start::Genesis, verify::Start::Retained);
    let log_dir = dir.or(configured_dir);
    let report = if files.is_empty() {
        let dir = log_dir
            .as_ref()
            .ok_or("give --dir, --config or the files to verify")?;
        verify::verify_dir(&keys, dir, start)
    } else {
        verify::verify_files(&keys, files, start)
    }
    .map_err(|e| format!("reading the audit log: {e}"))?;
    for warning in &report.warnings {
        println!("warning: {warning}");
    }
    let gap = match (&anchor, &log_dir, &report.problem) {
        (Some(anchor), Some(dir), None) => {
            let ends_at = report.range.map_or(0, |(_, last)| last);
            crate::audit::anchor::check(&keys, dir, ends_at, (anchor.seq, &anchor.mac))
                .map_err(|e| format!("reading the audit log: {e}"))?
                .err()
        }
        _ => None,
    };
    match (&report.problem, gap) {
        (Some(problem), _) => {
            println!("FAILED after {} good events: {problem}", report.events);
            Ok(ExitCode::from(1))
        }
        (None, Some(gap)) => {
            println!(
                "FAILED: the chain of {} events verifies, but against the store's anchor: {gap}",
                report.events
            );
            Ok(ExitCode::from(1))
        }
        (None, None) => {
            if let Some(anchor) = &anchor {
                println!(
                    "anchor: the store's last change was audited at sequence {}, and the log holds that line",
                    anchor.seq
                );
            }
            let range = report
                .range
                .map_or(String::new(), |(a, b)| format!(", sequence {a}..={b}"));
            println!(
                "OK: {} events in {} files verified{range}",
                report.events, report.files
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
