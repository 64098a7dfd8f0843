//! Process hygiene for a process that holds keys: no core dumps, and no reading of its memory by
//! other processes of the same user.
//!
//! `serve` calls [`disable_core_dumps`] before it reads any secret. `PR_SET_DUMPABLE = 0` stops core
//! dumps, makes `/proc/<pid>/mem`, `environ` and friends root-owned, and refuses `ptrace` attach
//! from unprivileged processes of the same user; `RLIMIT_CORE = 0` stops core files even where the
//! dumpable flag is reset (after an `execve` of a set-id program, which metapass never does).

use rustix::process::{self, DumpableBehavior, Resource, Rlimit};

/// What the kernel reports after hardening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hardening {
    /// Whether the process is still dumpable (`PR_GET_DUMPABLE`).
    pub dumpable: bool,
    /// The core-file size limit (soft, hard), in bytes.
    pub core_limit: (Option<u64>, Option<u64>),
}

/// Disables core dumps for this process and reads back what the kernel now says.
pub(crate) fn disable_core_dumps() -> std::io::Result<Hardening> {
    process::setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    process::set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    let limit = process::getrlimit(Resource::Core);
    Ok(Hardening {
        dumpable: process::dumpable_behavior()? != DumpableBehavior::NotDumpable,
        core_limit: (limit.current, limit.maximum),
    })
}
