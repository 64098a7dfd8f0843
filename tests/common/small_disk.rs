//! The daemon with its audit log on a small tmpfs in a private mount namespace (`unshare`, no
//! root needed on the host side), reachable from the test through /proc/<pid>/root.

use std::path::PathBuf;

use super::{Daemon, config_with};

/// Starts the daemon with its audit directory on a tmpfs of `size` (`mount -o size=`, e.g.
/// `1m`), its configuration text edited by `edit`.
pub fn daemon_with_audit_disk(size: &str, edit: impl FnOnce(String) -> String) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("data/audit");
    std::fs::create_dir_all(&audit).unwrap();
    let script = format!(
        "mount -t tmpfs -o size={size},mode=0700 tmpfs {} && exec \"$@\"",
        audit.display()
    );
    let config = config_with(dir.path(), edit);
    Daemon::start_wrapped(
        &config,
        dir,
        &[
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            &script,
            "sh",
        ],
    )
}

/// The daemon's audit directory as seen from here (inside its mount namespace).
pub fn audit_dir_inside(daemon: &Daemon) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/root{}",
        daemon.pid(),
        daemon.audit_dir().display()
    ))
}
