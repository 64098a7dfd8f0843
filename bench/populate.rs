//! Fills a metapass store for the benchmarks (`bench/run`), through the library, and writes the
//! signed headers wrk needs.
//!
//! ```text
//! cargo run --release --example bench-populate -- CONFIG DATA_DIR WITH_PASSWORD FRESH OUT_DIR
//! ```
//!
//! Registers `WITH_PASSWORD` instances of project-a with a 344-byte password (the base64 of an
//! RSA-2048 ciphertext, as cloudbase-init posts) and `FRESH` instances without one, for POST runs.
//! Writes `OUT_DIR/get-ids.txt` (a uniform sample of at most 65,536 instances with passwords) and
//! `OUT_DIR/post-ids.txt` (every fresh instance), one `<id> <signature>` per line.
//!
//! Setup goes around the audit log (open gates): it is not part of what is measured.

// Tests and benchmarks measure the real machine: crate::clock's rule is for the service's code.
#![allow(clippy::disallowed_methods)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::StreamExt;
use metapass::config::{Config, Overrides};
use metapass::crypto::RecordBinding;
use metapass::ids::{InstanceId, ProjectId};
use metapass::store::{Backend, PASSWORD_FIELD, Registration, Store, open_gate};

/// The blob every instance holds: 344 base64 characters (256 bytes, as an RSA-2048 ciphertext).
pub const BLOB: &str = concat!(
    "CzBVep/E6Q4zWH2ix+wRNluApcrvFDleg6jN8hc8YYar0PUaP2SJrtP4HUJnjLHW+yBFao+02f4jSG2St9wBJk",
    "twlbrfBClOc5i94gcsUXabwOUKL1R5nsPoDTJXfKHG6xA1Wn+kye4TOF2Cp8zxFjtgharP9Bk+Y4it0vccQWaL",
    "sNX6H0RpjrPY/SJHbJG22wAlSm+Uud4DKE1yl7zhBitQdZq/5AkuU3idwucMMVZ7oMXqDzRZfqPI7RI3XIGmy/",
    "AVOl+Eqc7zGD1ih6zR9htAZYqv1PkeQ2iNstf8IUZrkLXa/yRJbpO43QInTHGWu+AFKk90mb7jCC1Sd5zB5g==",
);

/// The instance id of benchmark instance `i` (a valid UUID v4 shape, stable across runs).
fn instance(i: u64) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

fn sign(key: &ring::hmac::Key, id: &str) -> String {
    hex::encode(ring::hmac::sign(key, id.as_bytes()).as_ref())
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, data_dir, with_password, fresh, out] = args.as_slice() else {
        return Err("usage: bench-populate CONFIG DATA_DIR WITH_PASSWORD FRESH OUT_DIR".into());
    };
    let with_password: u64 = with_password.parse().map_err(|_| "WITH_PASSWORD")?;
    let fresh: u64 = fresh.parse().map_err(|_| "FRESH")?;
    let out = PathBuf::from(out);
    assert_eq!(BLOB.len(), 344);
    let config = Config::load(
        std::path::Path::new(config),
        &Overrides {
            listen: None,
            data_dir: Some(PathBuf::from(data_dir)),
        },
    )
    .map_err(|e| e.to_string())?;
    let signer = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        secrecy::ExposeSecret::expose_secret(&config.proxy_secret).as_bytes(),
    );
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let metrics = metapass::metrics::Metrics::new();
        let store = Arc::new(
            Backend::open(&config.store, metrics.store_seconds)
                .await
                .map_err(|e| e.to_string())?,
        );
        let keyring = Arc::new(config.keyring);
        store
            .sync_keys(keyring.check_values(), open_gate())
            .await
            .map_err(|e| e.to_string())?;
        let project = ProjectId::parse("project-a").map_err(|e| e.to_string())?;
        let started = std::time::Instant::now();
        futures_util::stream::iter(0..with_password + fresh)
            .map(|i| {
                let (store, keyring, project) = (store.clone(), keyring.clone(), project.clone());
                async move {
                    let text = instance(i);
                    let id = InstanceId::parse(&text).expect("benchmark id");
                    store
                        .register(&id, &project, Registration::Ordinary, open_gate())
                        .await?;
                    if i < with_password {
                        let key_id = keyring.active_key_id();
                        let seal = Box::new(move |version| {
                            let binding = RecordBinding {
                                project_id: "project-a",
                                instance_id: &text,
                                field: PASSWORD_FIELD,
                                version,
                            };
                            keyring.seal(&binding, BLOB.as_bytes())
                        });
                        store
                            .set_password_once(&id, &project, key_id, seal, open_gate())
                            .await?;
                    }
                    Ok::<(), metapass::store::StoreError>(())
                }
            })
            .buffer_unordered(4096)
            .for_each(|result| async move { result.expect("populate") })
            .await;
        eprintln!(
            "populated {with_password} instances with a password and {fresh} without in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Ok::<(), String>(())
    })?;

    let mut get = std::io::BufWriter::new(
        std::fs::File::create(out.join("get-ids.txt")).map_err(|e| e.to_string())?,
    );
    let sample = with_password.min(65_536);
    for k in 0..sample {
        // Spread the sample evenly over all instances with a password.
        let i = k * with_password / sample;
        let id = instance(i);
        writeln!(get, "{id} {}", sign(&signer, &id)).map_err(|e| e.to_string())?;
    }
    let mut post = std::io::BufWriter::new(
        std::fs::File::create(out.join("post-ids.txt")).map_err(|e| e.to_string())?,
    );
    for i in with_password..with_password + fresh {
        let id = instance(i);
        writeln!(post, "{id} {}", sign(&signer, &id)).map_err(|e| e.to_string())?;
    }
    std::fs::write(out.join("blob.txt"), BLOB).map_err(|e| e.to_string())?;
    Ok(())
}
