//! Refusals before authentication, counted in one event per source and window instead of one
//! event each.
//!
//! An unauthenticated client decides how fast it is refused by a rate limit; if each refusal
//! wrote a full event, it would decide how fast the audit log grows (and a full disk then refuses
//! every guest). So a request refused by a rate limit *before authentication* is answered at once
//! (with its `X-Request-Id`) and counted: per source, at most one `rate_limit:aggregate` event per
//! window names how many were refused and lists their request ids (the first
//! [`MAX_IDS_PER_EVENT`]; the count is exact). Every access stays accounted for, and what one
//! source can make the log write is bounded: its rate limit's burst and rate in full events, plus
//! one aggregate per window. Aggregates are written when their window ends and at shutdown; a
//! crash loses at most one window of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use std::time::Instant;

use crate::clock::Clock;

use super::event::{Aggregate, Facts};

/// Refused request ids listed in one aggregate event (the count is exact beyond them).
pub const MAX_IDS_PER_EVENT: usize = 32;

/// How long refusals from one source are gathered into one event.
pub const WINDOW: Duration = Duration::from_secs(1);

struct Pending {
    /// The first refused request's facts: the source, listener and route the event describes.
    first: Facts,
    status: u16,
    since: Instant,
    count: u64,
    ids: Vec<String>,
}

/// Gathers pre-authentication refusals per source.
pub struct Refusals {
    max_sources: usize,
    pending: Mutex<HashMap<Option<IpAddr>, Pending>>,
    clock: Clock,
}

impl std::fmt::Debug for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refusals").finish_non_exhaustive()
    }
}

impl Refusals {
    /// At most `max_sources` sources gathered at once; the rest share one entry (source
    /// unknown in its event, never lost from the count).
    pub fn new(max_sources: usize, clock: Clock) -> Self {
        Self {
            max_sources: max_sources.max(1),
            pending: Mutex::default(),
            clock,
        }
    }

    /// Counts a refused request (its facts complete, `status` answered).
    pub fn add(&self, facts: &Facts, status: u16) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let mut key = Some(facts.client);
        if !pending.contains_key(&key) && pending.len() >= self.max_sources {
            key = None;
        }
        let entry = pending.entry(key).or_insert_with(|| Pending {
            first: facts.clone(),
            status,
            since: self.clock.now(),
            count: 0,
            ids: Vec::new(),
        });
        entry.count += 1;
        if entry.ids.len() < MAX_IDS_PER_EVENT {
            entry.ids.push(facts.request_id.to_string());
        }
    }

    /// The aggregate events due: windows that have ended, or all of them (`all`, at shutdown).
    /// Each comes as facts ready to encode, with the status the refused requests got.
    pub fn take_due(&self, all: bool) -> Vec<(Facts, u16)> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.clock.now();
        let due: Vec<Option<IpAddr>> = pending
            .iter()
            .filter(|(_, p)| all || now.duration_since(p.since) >= WINDOW)
            .map(|(k, _)| *k)
            .collect();
        due.into_iter()
            .filter_map(|key| pending.remove(&key).map(|p| (key, p)))
            .map(|(key, p)| {
                let mut facts = p.first;
                facts.request_id = crate::ids::RequestId::new();
                facts.operation = "rate_limit:aggregate";
                facts.started = now;
                if key.is_none() {
                    facts.client = std::net::IpAddr::from([0, 0, 0, 0]);
                }
                facts.detail = Some(format!(
                    "{} request(s) refused by a rate limit before authentication{}",
                    p.count,
                    if key.is_none() {
                        " from sources past the tracking bound"
                    } else {
                        ""
                    }
                ));
                facts.aggregate = Some(Aggregate {
                    count: p.count,
                    request_ids: p.ids,
                });
                (facts, p.status)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(ip: [u8; 4]) -> Facts {
        Facts::new(std::net::SocketAddr::from((ip, 4000)), None)
    }

    #[test]
    fn one_event_per_source_and_window_with_an_exact_count() {
        let clock = Clock::manual();
        let r = Refusals::new(2, clock.clone());
        let first = refused([10, 0, 0, 1]);
        r.add(&first, 503);
        for _ in 0..99 {
            r.add(&refused([10, 0, 0, 1]), 503);
        }
        r.add(&refused([10, 0, 0, 2]), 429);
        // Past the tracking bound: gathered under an unknown source, still counted.
        r.add(&refused([10, 0, 0, 3]), 429);
        assert!(r.take_due(false).is_empty(), "the window is still open");
        clock.advance(WINDOW);
        let mut due = r.take_due(false);
        due.sort_by_key(|(f, _)| f.client);
        assert_eq!(due.len(), 3);
        let (a, status) = &due[1];
        assert_eq!((a.client.to_string().as_str(), *status), ("10.0.0.1", 503));
        let agg = a.aggregate.as_ref().unwrap();
        assert_eq!(agg.count, 100);
        assert_eq!(agg.request_ids.len(), MAX_IDS_PER_EVENT);
        assert_eq!(agg.request_ids[0], first.request_id.to_string());
        assert_eq!(a.operation, "rate_limit:aggregate");
        assert_eq!(due[0].0.client.to_string(), "0.0.0.0");
        assert!(r.take_due(true).is_empty());
    }
}
