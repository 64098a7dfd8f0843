//! The `metapass` command: `serve`, `keys ...`, `dev-certs`, `audit ...`.

#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

use metapass::app::App;
use metapass::audit::{AuditKeys, Reason, review, verify};
use metapass::config::{Config, Overrides};
use metapass::limits;
use metapass::server;
use metapass::tls::TlsMaterial;

#[derive(Parser)]
#[command(
    name = "metapass",
    version,
    about = "OpenStack instance password service: sealed, owned, audited"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        #[arg(long, default_value_t = metapass::devcerts::DEFAULT_LEAF_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
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

/// Which keyring file to edit: the one a configuration names, or a file given directly.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct KeyringLocation {
    /// The daemon configuration (its [keys] file is edited, and its store consulted).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The keyring file itself (no store is consulted).
    #[arg(long)]
    file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write a new keyring file with one fresh random key (mode 0600; never overwrites).
    Generate {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a fresh random key to a keyring file and make it active. Reload the daemon (SIGHUP)
    /// to use it; passwords sealed under older keys are then resealed in the background.
    Rotate {
        #[command(flatten)]
        keyring: KeyringLocation,
    },
    /// Remove a key that no password is sealed under any more.
    Retire {
        #[command(flatten)]
        keyring: KeyringLocation,
        /// The key id to remove.
        #[arg(long)]
        id: u32,
        /// With --config: the data directory, if not the configured one.
        #[arg(long, requires = "config")]
        data_dir: Option<PathBuf>,
    },
    /// Show every key: active or not, how many passwords it seals, how many seals it has made.
    Status {
        /// The daemon configuration.
        #[arg(long)]
        config: PathBuf,
        /// The data directory, if not the configured one.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// Where the audit key comes from: the daemon's config, or the audit key file alone (a reviewer
/// needs no other secret).
#[derive(clap::Args)]
#[group(required = false, multiple = false)]
struct KeySource {
    /// The daemon configuration (its [audit] key_file is used).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The audit key file itself.
    #[arg(long)]
    audit_key: Option<PathBuf>,
}

/// Where the audit log is: an explicit directory, or the one the daemon configuration names.
#[derive(clap::Args)]
struct LogLocation {
    /// The audit log directory.
    #[arg(long, conflicts_with_all = ["config", "data_dir"])]
    dir: Option<PathBuf>,
    /// The daemon configuration (its audit directory is used).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The data directory, if not the configured one.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct EventFilter {
    /// Only events about this instance (as target or caller).
    #[arg(long)]
    instance: Option<String>,
    /// Only events where this project is the caller's or the target's.
    #[arg(long)]
    project: Option<String>,
    /// Only events with this outcome.
    #[arg(long, value_parser = ["success", "denied", "failure", "error"])]
    outcome: Option<String>,
    /// Only events since an RFC 3339 time or a duration ago (15m, 2h, 7days).
    #[arg(long)]
    since: Option<String>,
}

#[derive(Subcommand)]
enum AuditCommand {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _guard = init_logging();
    let result = match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            accept_audit_gap,
        } => serve(config, Overrides { listen, data_dir }, accept_audit_gap),
        Command::DevCerts { out, leaf_days } => dev_certs(out, leaf_days),
        // They read the audit secret or the keyring: the same hygiene as the daemon.
        Command::Audit { command } => harden().and_then(|()| audit(command)),
        Command::Keys { command } => harden().and_then(|()| keys(command)),
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
        } => import_nova(
            ImportArgs {
                db,
                db_password_file,
                db_ca_file,
                db_insecure_plaintext,
                dry_run,
                options: metapass::nova::import::ImportOptions {
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

/// What `import-nova` was asked.
struct ImportArgs {
    db: String,
    db_password_file: Option<PathBuf>,
    db_ca_file: Option<PathBuf>,
    db_insecure_plaintext: bool,
    dry_run: bool,
    options: metapass::nova::import::ImportOptions,
}

fn import_nova(
    args: ImportArgs,
    config: PathBuf,
    data_dir: Option<PathBuf>,
) -> Result<ExitCode, String> {
    use metapass::nova::import;
    // It holds the keyring and Nova's passwords: the same hygiene as the daemon.
    metapass::hygiene::disable_core_dumps().map_err(|e| format!("disabling core dumps: {e}"))?;
    let config = load(
        &config,
        &Overrides {
            listen: None,
            data_dir,
        },
    )?;
    let mut url = url::Url::parse(&args.db)
        .map_err(|_| "--db is not a URL (mysql://user@host:3306/nova)".to_owned())?;
    if url.password().is_some() {
        return Err(
            "--db must not carry a password (every local user can read a command line); use --db-password-file"
                .into(),
        );
    }
    if let Some(file) = &args.db_password_file {
        let password = zeroize::Zeroizing::new(
            std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?,
        );
        url.set_password(Some(password.trim()))
            .map_err(|()| "--db cannot carry a password".to_owned())?;
    }
    let url = zeroize::Zeroizing::new(url.to_string());
    if args.db_ca_file.is_none() {
        if !(config.dev_mode || args.db_insecure_plaintext) {
            return Err("import-nova reads Nova's database over TLS outside dev mode: give --db-ca-file (the CA of the database server's certificate), or --db-insecure-plaintext on a protected network".into());
        }
        tracing::warn!("reading Nova's database without TLS");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let report = runtime.block_on(async {
        let nova = import::NovaDatabase::new(&url, args.db_ca_file.as_deref())?;
        let report = if args.dry_run {
            let metrics = metapass::metrics::Metrics::new();
            let store = metapass::store::Backend::open(&config.store, metrics.store_seconds)
                .await
                .map_err(|e| e.to_string())?;
            import::dry_run(&nova, &store, &args.options).await
        } else {
            let app = App::open(config).await?;
            metapass::keys::state::load_at_startup(&app).await?;
            let report = import::run(&nova, &app, &args.options).await;
            app.auditor
                .flush()
                .await
                .map_err(|e| format!("flushing the audit log: {e}"))?;
            report
        };
        nova.close().await;
        report
    })?;
    let verb = if args.dry_run {
        "would import"
    } else {
        "imported"
    };
    println!(
        "{verb} {}, already present {}, skipped deleted {}, empty {}, conflicts {}, invalid {}, last_id {}",
        report.imported,
        report.already_present,
        report.skipped_deleted,
        report.empty,
        report.conflicts,
        report.invalid,
        report.last_id
    );
    Ok(ExitCode::SUCCESS)
}

fn load(config: &std::path::Path, overrides: &Overrides) -> Result<Config, String> {
    let config = Config::load(config, overrides).map_err(|e| e.to_string())?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    Ok(config)
}

/// A tool's view of the daemon configuration: `--data-dir` may move its data, nothing listens.
fn load_for_tool(config: &std::path::Path, data_dir: Option<PathBuf>) -> Result<Config, String> {
    load(
        config,
        &Overrides {
            listen: None,
            data_dir,
        },
    )
}

/// Opens the configured store on a runtime of its own and runs `read` on it (the audit tools).
fn read_store<T>(
    config: &Config,
    read: impl AsyncFnOnce(metapass::store::Backend) -> Result<T, String>,
) -> Result<T, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async {
        let metrics = metapass::metrics::Metrics::new();
        let store = metapass::store::Backend::open(&config.store, metrics.store_seconds.clone())
            .await
            .map_err(|e| format!("opening the store: {e}"))?;
        read(store).await
    })
}

/// No core dumps and no same-user ptrace before a secret is read.
fn harden() -> Result<(), String> {
    metapass::hygiene::disable_core_dumps()
        .map(|_| ())
        .map_err(|e| format!("disabling core dumps: {e}"))
}

fn audit_keys(config: &Config) -> Result<AuditKeys, String> {
    AuditKeys::derive(config.audit.secret.expose_secret()).map_err(|e| e.to_string())
}

fn serve(
    config_path: PathBuf,
    overrides: Overrides,
    accept_audit_gap: bool,
) -> Result<ExitCode, String> {
    // Before any secret is read: no core dumps, no same-user ptrace or /proc/<pid>/mem.
    let hardening = metapass::hygiene::disable_core_dumps()
        .map_err(|e| format!("disabling core dumps: {e}"))?;
    tracing::info!(
        dumpable = hardening.dumpable,
        core_limit = ?hardening.core_limit,
        "core dumps disabled (PR_SET_DUMPABLE, RLIMIT_CORE)"
    );
    let mut config = load(&config_path, &overrides)?;
    config.audit.accept_gap = accept_audit_gap;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("metapass-worker")
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async move {
        let mut material = TlsMaterial::load(config.tls.clone()).map_err(|e| e.to_string())?;
        let mut endpoints = Vec::new();
        for listener in config.listeners.clone() {
            let tls = if listener.tls {
                Some(material.listener(listener.client_auth).map_err(|e| format!("listener {:?}: {e}", listener.name))?)
            } else {
                None
            };
            let (name, address) = (listener.name.clone(), listener.address);
            endpoints.push(
                server::Endpoint::bind(listener, tls)
                    .map_err(|e| format!("listener {name:?}: binding {address}: {e}"))?,
            );
        }
        let data_dir = config.data_dir.clone();
        let cleanup_every = limits::cleanup_interval(&config.rate_limits);
        let notifications = config.notifications.clone();
        let app = Arc::new(App::open(config).await?);
        tracing::info!(store = app.store.kind(), "store open");
        let auditor = app.auditor.clone();
        // The keyring must match what the store has seen before anything is sealed or opened.
        metapass::keys::state::load_at_startup(&app).await?;
        tokio::spawn(metapass::keys::rewrap::rewrap_loop(app.clone()));
        if let Some(settings) = notifications {
            tokio::spawn(metapass::nova::notifications::run(app.clone(), settings));
        }
        tracing::info!(data_dir = %data_dir.display(), "metapass serving");
        // One line per listener on stdout: scripts and tests wait for them to know the ports.
        for endpoint in &endpoints {
            let url = endpoint.url().map_err(|e| e.to_string())?;
            println!("metapass listening on {url} ({})", endpoint.config.name);
        }
        let _ = std::io::stdout().flush();
        // Under systemd (Type=notify), readiness is the same moment: every listener is bound and
        // the keyring matched the store.
        notify_systemd(&[sd_notify::NotifyState::Ready]);

        // Idle rate-limit keys are swept on a timer, so limiter memory follows live traffic.
        let sweeper = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(cleanup_every);
            loop {
                tick.tick().await;
                sweeper.limiters.maintain();
            }
        });
        // SIGHUP reloads the certificate, key, client CA and CRLs (if any file is broken nothing
        // changes), then the keyring file (refused if it does not match the store). All audited.
        let reloader = app.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hangups) = signal(SignalKind::hangup()) else { return };
            while hangups.recv().await.is_some() {
                if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
                    notify_systemd(&[sd_notify::NotifyState::Reloading, now]);
                }
                let cert_file = material.cert_file().display().to_string();
                let (reason, detail) = match material.reload() {
                    Ok(()) => {
                        tracing::info!(cert = %cert_file, "certificate, client CA and CRLs reloaded");
                        (Reason::Ok, format!("reloaded {cert_file} and the client CA and CRLs"))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "certificate reload failed; still serving the previous certificate and trust");
                        (
                            Reason::CertificateReloadFailed,
                            format!("{e}; the previous certificate, client CA and CRLs stay in use"),
                        )
                    }
                };
                metapass::audit::gate::record_system_event(&reloader.auditor, "tls:reload", reason, detail).await;
                metapass::keys::state::reload_on_signal(&reloader).await;
                notify_systemd(&[sd_notify::NotifyState::Ready]);
            }
        });
        // Refusals before authentication are written as one event per source and window; the
        // same timer lets the writer sign a checkpoint when one is due.
        let aggregator = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(metapass::audit::aggregate::WINDOW / 2);
            loop {
                tick.tick().await;
                metapass::api::flush_refusals(&aggregator, false).await;
                aggregator.auditor.tick();
            }
        });
        let final_refusals = app.clone();
        let shutdown_app = app.clone();
        let shutdown = async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested: draining");
            notify_systemd(&[sd_notify::NotifyState::Stopping]);
            shutdown_app.shutting_down.store(true, Ordering::SeqCst);
        };
        server::run(app, endpoints, shutdown).await;
        metapass::api::flush_refusals(&final_refusals, true).await;
        auditor
            .flush()
            .await
            .map_err(|e| format!("flushing the audit log at shutdown: {e}"))?;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// Tells systemd about a state change when it started us with `NOTIFY_SOCKET`; nothing otherwise.
fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn dev_certs(out: PathBuf, leaf_days: u32) -> Result<ExitCode, String> {
    let files = metapass::devcerts::generate(&out, leaf_days).map_err(|e| e.to_string())?;
    for f in files {
        println!("wrote {}", f.display());
    }
    println!("These certificates and keys are for development only.");
    Ok(ExitCode::SUCCESS)
}

/// The audit keys from a config or an audit key file.
fn keys_from(
    source: &KeySource,
    data_dir: Option<PathBuf>,
) -> Result<(AuditKeys, Option<PathBuf>), String> {
    match (&source.config, &source.audit_key) {
        (Some(config), _) => {
            let config = load_for_tool(config, data_dir)?;
            Ok((audit_keys(&config)?, Some(config.audit.dir.clone())))
        }
        (None, Some(file)) => {
            let secret = metapass::config::load_audit_secret(file).map_err(|e| e.to_string())?;
            let keys = AuditKeys::derive(secret.expose_secret()).map_err(|e| e.to_string())?;
            Ok((keys, None))
        }
        (None, None) => Err("give --config or --audit-key".into()),
    }
}

/// `audit reconcile`: the whole log verified (chain from sequence 1, anchor), replayed, and
/// compared with the store's registry.
fn reconcile(config_path: &std::path::Path, data_dir: Option<PathBuf>) -> Result<ExitCode, String> {
    use metapass::audit::{anchor, reconcile};
    use metapass::store::Store;
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
fn verify_public(
    public_key: &std::path::Path,
    dir: Option<PathBuf>,
    files: Vec<PathBuf>,
) -> Result<ExitCode, String> {
    use metapass::audit::checkpoint;
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
fn stored_anchor(
    config: &std::path::Path,
    data_dir: Option<PathBuf>,
) -> Result<Option<metapass::store::AuditAnchor>, String> {
    use metapass::store::Store;
    let config = load_for_tool(config, data_dir)?;
    if let metapass::config::StoreConfig::Sqlite { path } = &config.store
        && !path.exists()
    {
        return Ok(None);
    }
    let writer =
        metapass::audit::writer::writer_id(config.audit.writer_id.as_deref(), &config.audit.dir);
    read_store(&config, async |store| {
        store
            .audit_anchor(&writer)
            .await
            .map_err(|e| format!("reading the audit anchor: {e}"))
    })
}

/// The audit directory named by `--dir`, or by the configuration.
fn log_dir(log: &LogLocation) -> Result<PathBuf, String> {
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

fn filter_from(f: EventFilter) -> Result<review::Filter, String> {
    let since = match &f.since {
        Some(text) => Some(review::parse_since(text, time::OffsetDateTime::now_utc())?),
        None => None,
    };
    Ok(review::Filter {
        instance: f.instance,
        project: f.project,
        outcome: f.outcome,
        since,
    })
}

fn read_log(log: &LogLocation) -> Result<Vec<serde_json::Value>, String> {
    let dir = log_dir(log)?;
    let files = review::files_of(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (events, warnings) =
        review::read_events(&files).map_err(|e| format!("reading the audit log: {e}"))?;
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
    Ok(events)
}

fn audit(command: AuditCommand) -> Result<ExitCode, String> {
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
                metapass::audit::checkpoint::format_public_key(&keys.checkpoint_public_key())
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
        } => {
            let anchor = match &key.config {
                Some(config) if files.is_empty() && dir.is_none() => {
                    stored_anchor(config, data_dir.clone())?
                }
                _ => None,
            };
            let (keys, configured_dir) = keys_from(&key, data_dir)?;
            let start = from_sequence.map_or(verify::Start::Genesis, verify::Start::Retained);
            let log_dir = dir.or(configured_dir);
            let report = if files.is_empty() {
                let dir = log_dir
                    .as_ref()
                    .ok_or("give --dir, --config or the files to verify")?;
                verify::verify_dir(&keys, dir, start)
            } else {
                verify::verify_files(&keys, &files, start)
            }
            .map_err(|e| format!("reading the audit log: {e}"))?;
            for warning in &report.warnings {
                println!("warning: {warning}");
            }
            let gap = match (&anchor, &log_dir, &report.problem) {
                (Some(anchor), Some(dir), None) => {
                    let ends_at = report.range.map_or(0, |(_, last)| last);
                    metapass::audit::anchor::check(&keys, dir, ends_at, (anchor.seq, &anchor.mac))
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

fn keys(command: KeysCommand) -> Result<ExitCode, String> {
    use metapass::keys::{KeySource as KeyringSource, KeyringFile};
    // The keyring file to edit and, with a configuration, the store to consult.
    let locate = |location: &KeyringLocation,
                  data_dir: Option<PathBuf>|
     -> Result<(PathBuf, Option<Config>), String> {
        match (&location.config, &location.file) {
            (Some(config), _) => {
                let overrides = Overrides {
                    listen: None,
                    data_dir,
                };
                let config = load(config, &overrides)?;
                match &config.keys.source {
                    KeyringSource::File(path) => Ok((path.clone(), Some(config))),
                    other => Err(format!(
                        "the keyring comes from {}; edit its text with --file on a copy",
                        other.describe()
                    )),
                }
            }
            (None, Some(file)) => Ok((file.clone(), None)),
            (None, None) => Err("give --config or --file".into()),
        }
    };
    let usage_of = |config: &Config| -> Result<Vec<metapass::store::KeyUsage>, String> {
        match &config.store {
            metapass::config::StoreConfig::Sqlite { path } => {
                metapass::store::sqlite::read_key_usage(path).map_err(|e| e.to_string())
            }
            metapass::config::StoreConfig::Postgres(settings) => {
                use metapass::store::Store;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    let store = metapass::store::postgres::PostgresStore::open_existing(settings)
                        .await
                        .map_err(|e| e.to_string())?;
                    store.key_usage().await.map_err(|e| e.to_string())
                })
            }
        }
    };
    match command {
        KeysCommand::Generate { out } => {
            KeyringFile::generate()
                .and_then(|file| file.write_new(&out))
                .map_err(|e| e.to_string())?;
            println!("wrote {} (mode 0600): key 1, active", out.display());
        }
        KeysCommand::Rotate { keyring } => {
            let (path, _) = locate(&keyring, None)?;
            let mut file = KeyringFile::read(&path).map_err(|e| e.to_string())?;
            let previous = file.active;
            let id = file.rotate().map_err(|e| e.to_string())?;
            file.replace(&path).map_err(|e| e.to_string())?;
            println!(
                "{}: added key {id} (active; was {previous}). Reload the daemon (SIGHUP or POST \
                 /admin/v1/keys/reload); passwords under older keys are then resealed under key {id}.",
                path.display()
            );
        }
        KeysCommand::Retire {
            keyring,
            id,
            data_dir,
        } => {
            let (path, config) = locate(&keyring, data_dir)?;
            let mut file = KeyringFile::read(&path).map_err(|e| e.to_string())?;
            if let Some(config) = &config {
                let records = usage_of(config)?
                    .iter()
                    .find(|u| u.key_id == id)
                    .map_or(0, |u| u.records);
                if records > 0 {
                    return Err(format!(
                        "key {id} still seals {records} passwords; let the rewrap move them (GET /admin/v1/keys shows progress), then retire it"
                    ));
                }
            }
            file.retire(id).map_err(|e| e.to_string())?;
            file.replace(&path).map_err(|e| e.to_string())?;
            println!("{}: removed key {id}.", path.display());
            if config.is_none() {
                println!(
                    "No store was consulted (--file): a daemon refuses to reload a keyring that lacks a key its passwords still need."
                );
            }
        }
        KeysCommand::Status { config, data_dir } => {
            let config = load(
                &config,
                &Overrides {
                    listen: None,
                    data_dir,
                },
            )?;
            let usage = usage_of(&config)?;
            let keyring = &config.keyring;
            let mut ids: Vec<u32> = keyring.key_ids().collect();
            ids.extend(usage.iter().map(|u| u.key_id));
            ids.sort_unstable();
            ids.dedup();
            println!("keyring: {}", config.keys.source.describe());
            println!(
                "{:>6}  {:<6}  {:<6}  {:>10}  {:>12}",
                "key", "active", "loaded", "passwords", "seals"
            );
            for id in ids {
                let used = usage.iter().find(|u| u.key_id == id);
                println!(
                    "{:>6}  {:<6}  {:<6}  {:>10}  {:>12}",
                    id,
                    if id == keyring.active_key_id() {
                        "yes"
                    } else {
                        ""
                    },
                    if keyring.holds(id) { "yes" } else { "NO" },
                    used.map_or(0, |u| u.records),
                    used.map_or(0, |u| u.seals),
                );
            }
            println!(
                "seal limit per key: {}",
                metapass::crypto::MAX_SEALS_PER_KEY
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
