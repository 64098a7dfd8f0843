//! `metapass keys ...`: make, rotate and retire data keys in a keyring file; show their use.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::load;
use crate::config::{Config, Overrides};
use crate::keys::{KeySource as KeyringSource, KeyringFile};

/// Which keyring file to edit: the one a configuration names, or a file given directly.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub(crate) struct KeyringLocation {
    /// The daemon configuration (its [keys] file is edited, and its store consulted).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// The keyring file itself (no store is consulted).
    #[arg(long)]
    pub(crate) file: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
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

pub(crate) fn run(command: KeysCommand) -> Result<ExitCode, String> {
    match command {
        KeysCommand::Generate { out } => generate(&out)?,
        KeysCommand::Rotate { keyring } => rotate(&keyring)?,
        KeysCommand::Retire {
            keyring,
            id,
            data_dir,
        } => retire(&keyring, id, data_dir)?,
        KeysCommand::Status { config, data_dir } => status(&config, data_dir)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn generate(out: &std::path::Path) -> Result<(), String> {
    KeyringFile::generate()
        .and_then(|file| file.write_new(out))
        .map_err(|e| e.to_string())?;
    println!("wrote {} (mode 0600): key 1, active", out.display());
    Ok(())
}

fn rotate(keyring: &KeyringLocation) -> Result<(), String> {
    let (path, _) = locate(keyring, None)?;
    let mut file = KeyringFile::read(&path).map_err(|e| e.to_string())?;
    let previous = file.active;
    let id = file.rotate().map_err(|e| e.to_string())?;
    file.replace(&path).map_err(|e| e.to_string())?;
    println!(
        "{}: added key {id} (active; was {previous}). Reload the daemon (SIGHUP or POST \
         /admin/v1/keys/reload); passwords under older keys are then resealed under key {id}.",
        path.display()
    );
    Ok(())
}

fn retire(keyring: &KeyringLocation, id: u32, data_dir: Option<PathBuf>) -> Result<(), String> {
    let (path, config) = locate(keyring, data_dir)?;
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
    Ok(())
}

fn status(config: &std::path::Path, data_dir: Option<PathBuf>) -> Result<(), String> {
    let config = load(
        config,
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
    println!("seal limit per key: {}", crate::crypto::MAX_SEALS_PER_KEY);
    Ok(())
}

/// The keyring file to edit and, with a configuration, the store to consult.
fn locate(
    location: &KeyringLocation,
    data_dir: Option<PathBuf>,
) -> Result<(PathBuf, Option<Config>), String> {
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
}

/// What the configured store says each key seals, read without starting the daemon.
fn usage_of(config: &Config) -> Result<Vec<crate::store::KeyUsage>, String> {
    match &config.store {
        crate::config::StoreConfig::Sqlite { path } => {
            crate::store::sqlite::read_key_usage(path).map_err(|e| e.to_string())
        }
        crate::config::StoreConfig::Postgres(settings) => {
            use crate::store::Store;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let store = crate::store::postgres::PostgresStore::open_existing(settings)
                    .await
                    .map_err(|e| e.to_string())?;
                store.key_usage().await.map_err(|e| e.to_string())
            })
        }
    }
}
