//! The audit log: one OCSF "API Activity" event per request, in a tamper-evident chain, written by a
//! dedicated durable writer.
//!
//! - [`event`]: the facts handlers record and their OCSF JSON form.
//! - [`chain`]: the audit keys, keyed fingerprints, and the per-line MAC chain.
//! - [`checkpoint`]: signed checkpoints a public key verifies.
//! - [`writer`]: the bounded queue and the group-committing writer thread.
//! - [`verify`]: checking a chain of files.
//! - [`anchor`]: checking the log against the chain head the store recorded with the last change.
//! - [`reconcile`]: the store against what the log says each instance's state is.
//! - [`review`]: `audit show` and `audit summary` for reviewers.
//!
//! The schema and an example of each event type are in `SECURITY.md`.

pub mod aggregate;
pub mod anchor;
pub mod chain;
pub mod checkpoint;
pub mod event;
pub mod gate;
pub mod reconcile;
pub mod review;
pub mod verify;
pub mod writer;

pub use chain::{AuditKeys, FINGERPRINT_PREFIX};
pub use event::{
    Activity, AuthMethod, Caller, CallerKind, Decision, Facts, Outcome, Reason, Surface,
};
pub use writer::{
    AuditError, AuditTicket, Auditor, Durability, SyncMode, WriterConfig, Written,
    submitted_together,
};
