//! Where "now" comes from.
//!
//! Decisions that depend on time (a request's deadline, how long Keystone's answer is trusted,
//! when a refusal window closes) read a [`Clock`], so that tests can hold time still or move it.
//! The rate limiter has its own clock (governor's), and timers of real I/O (socket and handshake
//! deadlines, the audit writer's batches, latency metrics) read [`io_now`]: they measure the real
//! machine and would mean nothing on a test clock. Clippy refuses `Instant::now` and
//! `OffsetDateTime::now_utc` everywhere else (`clippy.toml`).

#![allow(clippy::disallowed_methods)]

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use time::OffsetDateTime;

/// A source of monotonic and wall-clock time: the system's, or a manual one in tests.
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<Mutex<(Instant, OffsetDateTime)>>>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.manual.is_some() {
            "Clock(manual)"
        } else {
            "Clock(system)"
        })
    }
}

impl Clock {
    /// The system's clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that moves only when [`Clock::advance`] is called, starting now.
    pub fn manual() -> Self {
        Self {
            manual: Some(Arc::new(Mutex::new((
                Instant::now(),
                OffsetDateTime::now_utc(),
            )))),
        }
    }

    /// Moves a manual clock forward (a system clock is left alone).
    pub fn advance(&self, by: Duration) {
        if let Some(manual) = &self.manual {
            let mut now = manual.lock().unwrap_or_else(PoisonError::into_inner);
            now.0 += by;
            now.1 += by;
        }
    }

    /// Monotonic now.
    pub fn now(&self) -> Instant {
        match &self.manual {
            None => Instant::now(),
            Some(manual) => manual.lock().unwrap_or_else(PoisonError::into_inner).0,
        }
    }

    /// Wall-clock now (UTC).
    pub fn now_utc(&self) -> OffsetDateTime {
        match &self.manual {
            None => OffsetDateTime::now_utc(),
            Some(manual) => manual.lock().unwrap_or_else(PoisonError::into_inner).1,
        }
    }
}

/// Monotonic now for timers of real I/O (socket deadlines, writer batches, latency metrics),
/// which must follow the machine, not a test clock.
pub fn io_now() -> Instant {
    Instant::now()
}

/// [`io_now`] on tokio's timer (which tokio's paused test time does control).
pub fn io_now_tokio() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// Wall-clock now for what is stamped rather than decided: file names, certificates, dates in
/// generated files, and the `--since` of a reviewer's query.
pub fn wall_now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = Clock::manual();
        let (t0, w0) = (clock.now(), clock.now_utc());
        assert_eq!(clock.now(), t0);
        clock.advance(Duration::from_secs(90));
        assert_eq!(clock.now() - t0, Duration::from_secs(90));
        assert_eq!(clock.now_utc() - w0, time::Duration::seconds(90));
    }
}
