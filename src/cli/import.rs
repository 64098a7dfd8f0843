//! `metapass import-nova`: Nova's stored passwords taken over (see [`crate::nova::import`]).

use std::path::PathBuf;
use std::process::ExitCode;

use super::load;
use crate::app::App;
use crate::config::Overrides;

/// What `import-nova` was asked.
pub(crate) struct ImportArgs {
    pub(crate) db: String,
    pub(crate) db_password_file: Option<PathBuf>,
    pub(crate) db_ca_file: Option<PathBuf>,
    pub(crate) db_insecure_plaintext: bool,
    pub(crate) dry_run: bool,
    pub(crate) options: crate::nova::import::ImportOptions,
}

pub(crate) fn run(
    args: ImportArgs,
    config: PathBuf,
    data_dir: Option<PathBuf>,
) -> Result<ExitCode, String> {
    use crate::nova::import;
    // It holds the keyring and Nova's passwords: the same hygiene as the daemon.
    crate::hygiene::disable_core_dumps().map_err(|e| format!("disabling core dumps: {e}"))?;
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
            let metrics = crate::metrics::Metrics::new();
            let store = crate::store::Backend::open(&config.store, metrics.store_seconds)
                .await
                .map_err(|e| e.to_string())?;
            import::dry_run(&nova, &store, &args.options).await
        } else {
            let app = App::open(config).await?;
            crate::keys::state::load_at_startup(&app).await?;
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
