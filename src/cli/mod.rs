//! The `metapass` command line: `serve`, `keys ...`, `dev-certs`, `audit ...`, `import-nova`.
//!
//! The binary only calls [`main`]; each command's work is in its module (`serve`, `audit`,
//! `keys`, `import`), and the library does the rest.

mod audit;
mod import;
mod keys;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

use crate::audit::AuditKeys;
use crate::config::{Config, Overrides};
use audit::AuditCommand;
use keys::KeysCommand;

#[derive(Parser)]
#[command(
    name = "metapass",
    version,
    about = "OpenStack instance password service: sealed, owned, audited"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the daemon.
    Serve {
        /// The configuration file (e.g. policy/dev.toml).
        #[arg(long)]
        config: PathBuf,
        /// Listen on this address instead of the configured one (port 0 picks a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Keep the store and audit log under this directory instead of the configured one.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Start although the audit log lacks the line the store recorded with the last change
        /// (files deleted, tail cut): the loss is recorded as an `audit:gap_accepted` event.
        #[arg(long)]
        accept_audit_gap: bool,
    },
    /// Write a fresh set of development certificates (never for production).
    DevCerts {
        /// The output directory.
        #[arg(long, default_value = "certs-dev")]
        out: PathBuf,
        /// Validity of the server and client certificates, in days. The committed set uses the
        /// default so a clone keeps working; TLS scanners expect at most 398 (a public CA's limit).
        #[arg(long, default_value_t = crate::devcerts::DEFAULT_LEAF_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
        leaf_days: u32,
    },
    /// Audit log tools for reviewers.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Take over the passwords Nova keeps in its database: register each live instance and seal
    /// its password into the store. Idempotent; run with the daemon on this data directory
    /// stopped (a dry run may run beside it).
    ImportNova {
        /// Nova's database, read only: mysql://user@host:3306/nova (no password here).
        #[arg(long)]
        db: String,
        /// A file holding the database password (mode 0600).
        #[arg(long)]
        db_password_file: Option<PathBuf>,
        /// The CA the database server's certificate must chain to: TLS, required outside dev
        /// mode (a server without TLS is then refused).
        #[arg(long)]
        db_ca_file: Option<PathBuf>,
        /// Read Nova's database without TLS outside dev mode (a protected network only).
        #[arg(long, conflicts_with = "db_ca_file")]
        db_insecure_plaintext: bool,
        /// The metapass configuration.
        #[arg(long)]
        config: PathBuf,
        /// The data directory, if not the configured one.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Count what would be imported; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Instances per batch.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10000))]
        batch: u32,
        /// Resume after this Nova instances.id (the last_id a run printed).
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Data key tools: make, rotate and retire keys in a keyring file; show their use.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_env("METAPASS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    guard
}

/// Parses the command line, starts logging, runs the command and turns its error into a message
/// and a failing exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let _guard = init_logging();
    let result = match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            accept_audit_gap,
        } => serve::run(config, Overrides { listen, data_dir }, accept_audit_gap),
        Command::DevCerts { out, leaf_days } => dev_certs(out, leaf_days),
        // They read the audit secret or the keyring: the same hygiene as the daemon.
        Command::Audit { command } => harden().and_then(|()| audit::run(command)),
        Command::Keys { command } => harden().and_then(|()| keys::run(command)),
        Command::ImportNova {
            db,
            db_password_file,
            db_ca_file,
            db_insecure_plaintext,
            config,
            data_dir,
            dry_run,
            batch,
            after,
        } => import::run(
            import::ImportArgs {
                db,
                db_password_file,
                db_ca_file,
                db_insecure_plaintext,
                dry_run,
                options: crate::nova::import::ImportOptions {
                    batch: batch as usize,
                    after,
                },
            },
            config,
            data_dir,
        ),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("metapass: {message}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn load(config: &std::path::Path, overrides: &Overrides) -> Result<Config, String> {
    let config = Config::load(config, overrides).map_err(|e| e.to_string())?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    Ok(config)
}

/// A tool's view of the daemon configuration: `--data-dir` may move its data, nothing listens.
pub(crate) fn load_for_tool(
    config: &std::path::Path,
    data_dir: Option<PathBuf>,
) -> Result<Config, String> {
    load(
        config,
        &Overrides {
            listen: None,
            data_dir,
        },
    )
}

/// Opens the configured store on a runtime of its own and runs `read` on it (the audit tools).
pub(crate) fn read_store<T>(
    config: &Config,
    read: impl AsyncFnOnce(crate::store::Backend) -> Result<T, String>,
) -> Result<T, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async {
        let metrics = crate::metrics::Metrics::new();
        let store = crate::store::Backend::open(&config.store, metrics.store_seconds.clone())
            .await
            .map_err(|e| format!("opening the store: {e}"))?;
        read(store).await
    })
}

/// No core dumps and no same-user ptrace before a secret is read.
pub(crate) fn harden() -> Result<(), String> {
    crate::hygiene::disable_core_dumps()
        .map(|_| ())
        .map_err(|e| format!("disabling core dumps: {e}"))
}

pub(crate) fn audit_keys(config: &Config) -> Result<AuditKeys, String> {
    AuditKeys::derive(config.audit.secret.expose_secret()).map_err(|e| e.to_string())
}

fn dev_certs(out: PathBuf, leaf_days: u32) -> Result<ExitCode, String> {
    let files = crate::devcerts::generate(&out, leaf_days).map_err(|e| e.to_string())?;
    for f in files {
        println!("wrote {}", f.display());
    }
    println!("These certificates and keys are for development only.");
    Ok(ExitCode::SUCCESS)
}
