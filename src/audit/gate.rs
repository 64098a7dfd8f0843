//! The audit gate: how a mutation's event becomes durable *before* the store commits it.
//!
//! A store mutation takes a [`Gate`]: the store calls it inside its transaction with the outcome it
//! is about to commit, and commits only once the returned ticket says the event is durable (its
//! place in the chain then becomes the store's [`AuditAnchor`]). [`gated`] is the one way to make
//! such a call: it builds the gate from the event's facts, runs the store call, and notes what
//! became of the event, so that the request's finish step (or [`SystemTask::finish`]) writes it
//! exactly once: not at all when the gate's event stands, a correction when the gate ran but the
//! store did not commit.
//!
//! The outcome decides the event: `answer` maps it to the status (or the refusal) the answer will
//! carry, and the handler calls the same function on the returned outcome, so the event and the
//! answer cannot disagree.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::event::encode;
use super::{Activity, AuditError, Auditor, Durability, Facts, Reason};
use crate::store::{AuditAnchor, Gate, GateDenied, StoreError};

/// What an answer records in its event: the status it carries and, for a refusal, the reason and
/// message (implemented by the API's `Result<StatusCode, ApiError>`).
pub trait Verdict {
    /// Records the refusal, if this is one, in `facts`; returns the status.
    fn record(&self, facts: &mut Facts) -> u16;
}

/// Maps a store outcome to its answer, adding facts (a record version) on the way.
pub type Answer<O, V> = fn(&O, &mut Facts) -> V;

/// What became of the event a gate submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GateEvent {
    /// No gate ran: the finish step records the event.
    #[default]
    None,
    /// The gate's event is the operation's event.
    Recorded,
    /// The gate submitted an event but the store did not commit: the finish step records a
    /// correction.
    NeedsCorrection,
}

impl GateEvent {
    /// What the finish step must write: nothing (`None`), the event, or (`Some(true)`) its
    /// correction.
    pub fn to_write(self) -> Option<bool> {
        match self {
            GateEvent::Recorded => None,
            GateEvent::None => Some(false),
            GateEvent::NeedsCorrection => Some(true),
        }
    }

    /// After a panic the answer is a 500: an event a gate had already recorded (with the status the
    /// handler meant to send) must be corrected rather than left standing.
    pub fn after_panic(self) -> GateEvent {
        match self {
            GateEvent::Recorded => GateEvent::NeedsCorrection,
            other => other,
        }
    }
}

/// Something audited that may change the store through a gate: a request (the API's exchange) or
/// an operation metapass performs by itself ([`SystemTask`]).
pub trait Audited {
    /// The event's facts.
    fn facts(&mut self) -> &mut Facts;
    /// What became of a gate's event.
    fn gate_event(&mut self) -> &mut GateEvent;
}

/// Runs one store mutation behind a gate that records `host`'s event (completed by `answer` from
/// the outcome) durably before the store commits, and notes whether that event stands.
pub async fn gated<H, O, V, F, Fut>(
    host: &mut H,
    auditor: &Auditor,
    answer: Answer<O, V>,
    store_call: F,
) -> Result<O, StoreError>
where
    H: Audited,
    O: 'static,
    V: Verdict + 'static,
    F: FnOnce(Gate<O>) -> Fut,
    Fut: Future<Output = Result<O, StoreError>>,
{
    let invoked = Arc::new(AtomicBool::new(false));
    let gate = recording_gate(host.facts().clone(), auditor, answer, invoked.clone());
    let result = store_call(gate).await;
    if invoked.load(Ordering::SeqCst) {
        *host.gate_event() = match result {
            Ok(_) => GateEvent::Recorded,
            Err(_) => GateEvent::NeedsCorrection,
        };
    }
    result
}

fn recording_gate<O: 'static, V: Verdict + 'static>(
    mut facts: Facts,
    auditor: &Auditor,
    answer: Answer<O, V>,
    invoked: Arc<AtomicBool>,
) -> Gate<O> {
    let auditor = auditor.clone();
    Box::new(move |outcome: &O| {
        invoked.store(true, Ordering::SeqCst);
        let status = answer(outcome, &mut facts).record(&mut facts);
        let line = encode(&facts, status, facts.started.elapsed());
        let ticket = auditor.submit(line, Durability::Durable);
        let writer = auditor.shared_writer_id();
        Box::pin(async move {
            match ticket.written().await {
                Ok(written) => Ok(written.map(|w| AuditAnchor {
                    writer,
                    seq: w.seq,
                    mac: w.mac,
                })),
                Err(e) => Err(GateDenied(e.to_string())),
            }
        })
    })
}

/// An operation metapass performs by itself (a keyring load, a rewrap, a notification from Nova):
/// audited exactly like a request, with caller `System`.
pub struct SystemTask {
    /// The event's facts.
    pub facts: Facts,
    gate_event: GateEvent,
}

impl SystemTask {
    /// A task named `operation` (its `api.operation`).
    pub fn new(operation: &'static str, activity: Activity) -> Self {
        Self {
            facts: Facts::system(operation, activity),
            gate_event: GateEvent::None,
        }
    }

    /// Records the task's event with `status`, unless its gate already did; after a gate whose
    /// store call failed, records the correction. Durable either way.
    pub async fn finish(mut self, auditor: &Auditor, status: u16) -> Result<(), AuditError> {
        let Some(correction) = self.gate_event.to_write() else {
            return Ok(());
        };
        self.facts.corrects_earlier_event = correction;
        let line = encode(&self.facts, status, self.facts.started.elapsed());
        auditor.record(line, Durability::Durable).await
    }

    /// Ends the task as refused (the refusal's reason, detail and status recorded).
    pub async fn fail(
        mut self,
        auditor: &Auditor,
        refusal: &impl Verdict,
    ) -> Result<(), AuditError> {
        let status = refusal.record(&mut self.facts);
        self.finish(auditor, status).await
    }
}

impl Audited for SystemTask {
    fn facts(&mut self) -> &mut Facts {
        &mut self.facts
    }
    fn gate_event(&mut self) -> &mut GateEvent {
        &mut self.gate_event
    }
}

/// Records an event metapass caused itself (`operation`, e.g. `tls:reload`), with `reason` and a
/// `detail` that must not contain secrets.
pub async fn record_system_event(
    auditor: &Auditor,
    operation: &'static str,
    reason: Reason,
    detail: String,
) {
    let mut facts = Facts::system(operation, Activity::Update);
    facts.reason = reason;
    facts.detail = Some(detail);
    let status = if reason == Reason::Ok { 200 } else { 500 };
    let line = encode(&facts, status, facts.started.elapsed());
    if let Err(e) = auditor.record(line, Durability::Durable).await {
        tracing::error!(error = %e, operation, "could not audit a system event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_after_a_recorded_gate_corrects_the_event() {
        // The gate recorded the status the handler meant to send; the answer is now a 500.
        assert_eq!(
            GateEvent::Recorded.after_panic(),
            GateEvent::NeedsCorrection
        );
        assert_eq!(GateEvent::None.after_panic(), GateEvent::None);
        assert_eq!(
            GateEvent::NeedsCorrection.after_panic(),
            GateEvent::NeedsCorrection
        );
    }

    #[test]
    fn the_finish_step_writes_the_event_once() {
        assert_eq!(GateEvent::None.to_write(), Some(false));
        assert_eq!(GateEvent::Recorded.to_write(), None);
        assert_eq!(GateEvent::NeedsCorrection.to_write(), Some(true));
    }
}
