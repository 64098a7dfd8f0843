//! Each listener's live connections: its cap, and what gives way under pressure.
//!
//! A listener holds at most `cap` connections (so the instance network cannot exhaust the admin,
//! compute or ops listeners). When it is full, a new connection still gets in by shedding one
//! that is doing nothing for anyone: first one that has not completed a request yet (a silent or
//! slow client: it has cost the most and given the least), then the one idle longest between
//! keep-alive requests; among those, one from the source holding the most connections, then the
//! oldest. A flood from a few addresses thus sheds its own connections, not the one a lone
//! client opened a moment ago and is still completing its handshake on. A connection with a request in flight is never shed; when every
//! connection has one, the newcomer is refused (closed at once). As the listener fills, the
//! first-request and idle timeouts shorten (see [`Registry::scaled`]), as nginx and Envoy's
//! overload manager do.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The shortest a timeout becomes under pressure.
const MIN_TIMEOUT: Duration = Duration::from_secs(1);

/// One live connection, as its listener sees it.
#[derive(Debug)]
pub(crate) struct ConnState {
    id: u64,
    /// The TCP peer's address (the load balancer's, behind a PROXY-protocol one).
    source: IpAddr,
    accepted: Instant,
    /// Requests in flight.
    active: AtomicUsize,
    /// Requests completed.
    served: AtomicU64,
    /// When the last request completed, in milliseconds after `accepted`.
    last_done_ms: AtomicU64,
    shed: AtomicBool,
    serving: AtomicBool,
    notify: Notify,
}

impl ConnState {
    /// The connection is past its handshakes and serving HTTP: from now on it closes itself
    /// gracefully when shed.
    pub(crate) fn set_serving(&self) {
        self.serving.store(true, Ordering::SeqCst);
    }

    /// Whether it is serving HTTP.
    pub(crate) fn is_serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    /// When the connection was accepted.
    pub(crate) fn accepted(&self) -> Instant {
        self.accepted
    }

    /// A request began.
    pub(crate) fn request_started(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
    }

    /// A request ended (answered, or abandoned by its client).
    pub(crate) fn request_finished(&self) {
        let ms = u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_done_ms.store(ms, Ordering::SeqCst);
        self.served.fetch_add(1, Ordering::SeqCst);
        self.active.fetch_sub(1, Ordering::SeqCst);
    }

    /// Requests in flight.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Requests completed.
    pub(crate) fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// Since when the connection has been waiting for a client: its acceptance before the first
    /// request, the end of the last request after it.
    pub(crate) fn waiting_since(&self) -> Instant {
        if self.served() == 0 {
            self.accepted
        } else {
            self.accepted + Duration::from_millis(self.last_done_ms.load(Ordering::SeqCst))
        }
    }

    /// Whether the listener asked this connection to give way.
    pub(crate) fn is_shed(&self) -> bool {
        self.shed.load(Ordering::SeqCst)
    }

    /// Resolves once the listener asks this connection to give way.
    pub(crate) async fn shed_requested(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_shed() {
                return;
            }
            notified.await;
        }
    }

    fn shed(&self) {
        self.shed.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

/// One listener's connections.
#[derive(Debug)]
pub(crate) struct Registry {
    cap: usize,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<ConnState>>>,
    /// Wakes the drain when the last connection goes.
    emptied: Notify,
}

/// A registered connection; leaves the registry when dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    registry: Arc<Registry>,
    /// The connection's state, shared with its requests.
    pub state: Arc<ConnState>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut live = self
            .registry
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        live.remove(&self.state.id);
        if live.is_empty() {
            self.registry.emptied.notify_waiters();
        }
    }
}

/// How an admission went.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Room was free.
    Admitted(Admitted),
    /// Room was made by shedding another connection.
    Shed(Admitted),
    /// Full of connections with requests in flight: refused.
    Full,
}

impl Registry {
    /// A registry for at most `cap` connections.
    pub(crate) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            next_id: AtomicU64::new(0),
            live: Mutex::default(),
            emptied: Notify::new(),
        })
    }

    /// Connections held now.
    pub(crate) fn len(&self) -> usize {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether none is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Admits a new connection, shedding one that serves nobody if the listener is full.
    pub(crate) fn admit(self: &Arc<Self>, source: IpAddr) -> Admission {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        // Connections already asked to give way are on their way out and do not count.
        let holding = live.values().filter(|c| !c.is_shed()).count();
        let mut shed = false;
        if holding >= self.cap {
            let mut per_source: HashMap<IpAddr, usize> = HashMap::new();
            for c in live.values().filter(|c| !c.is_shed()) {
                *per_source.entry(c.source).or_default() += 1;
            }
            let idle = live.values().filter(|c| !c.is_shed() && c.active() == 0);
            // Never served before ever served; then the source holding the most; then the
            // longest waiting.
            let victim = idle.min_by_key(|c| {
                (
                    c.served() > 0,
                    Reverse(per_source.get(&c.source).copied().unwrap_or(0)),
                    c.waiting_since(),
                    c.id,
                )
            });
            match victim {
                Some(victim) => {
                    victim.shed();
                    shed = true;
                }
                None => return Admission::Full,
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let state = Arc::new(ConnState {
            id,
            source,
            accepted: crate::clock::io_now_tokio(),
            active: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            last_done_ms: AtomicU64::new(0),
            shed: AtomicBool::new(false),
            serving: AtomicBool::new(false),
            notify: Notify::new(),
        });
        live.insert(id, state.clone());
        let admitted = Admitted {
            registry: self.clone(),
            state,
        };
        if shed {
            Admission::Shed(admitted)
        } else {
            Admission::Admitted(admitted)
        }
    }

    /// `base` shortened as the listener fills: whole below half full, then down linearly to a
    /// tenth at full, never below one second (nor above `base`).
    pub(crate) fn scaled(&self, base: Duration) -> Duration {
        let occupancy = self.len() as f64 / self.cap as f64;
        let factor = if occupancy <= 0.5 {
            1.0
        } else {
            (1.0 - (occupancy - 0.5) * 1.8).max(0.1)
        };
        base.mul_f64(factor).max(MIN_TIMEOUT).min(base)
    }

    /// Asks every connection to give way (shutdown) and waits until none is left or `deadline`.
    pub(crate) async fn drain(&self, deadline: Instant) {
        loop {
            let emptied = self.emptied.notified();
            {
                let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
                if live.is_empty() {
                    return;
                }
                for conn in live.values() {
                    conn.shed();
                }
            }
            if tokio::time::timeout_at(deadline, emptied).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    fn admitted(a: Admission) -> Admitted {
        match a {
            Admission::Admitted(a) | Admission::Shed(a) => a,
            Admission::Full => panic!("full"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_listener_sheds_the_oldest_silent_connection_first() {
        let r = Registry::new(3);
        let served = admitted(r.admit(ONE));
        served.state.request_started();
        served.state.request_finished();
        tokio::time::advance(Duration::from_secs(1)).await;
        let silent_old = admitted(r.admit(ONE));
        tokio::time::advance(Duration::from_secs(1)).await;
        let silent_new = admitted(r.admit(ONE));
        // Full: the oldest connection that never completed a request gives way.
        let Admission::Shed(fourth) = r.admit(ONE) else {
            panic!("expected a shed")
        };
        assert!(silent_old.state.is_shed());
        assert!(!silent_new.state.is_shed() && !served.state.is_shed());
        drop(silent_old);
        // Then the other silent one, then the idle keep-alive connection.
        assert!(matches!(r.admit(ONE), Admission::Shed(_)));
        assert!(silent_new.state.is_shed());
        drop(silent_new);
        // Full again with two busy connections: the idle keep-alive one gives way.
        fourth.state.request_started();
        let busy = admitted(r.admit(ONE));
        busy.state.request_started();
        assert!(matches!(r.admit(ONE), Admission::Shed(_)));
        assert!(
            served.state.is_shed(),
            "idle keep-alive goes before busy ones"
        );
        assert!(!fourth.state.is_shed() && !busy.state.is_shed());
    }

    #[tokio::test(start_paused = true)]
    async fn connections_with_requests_in_flight_are_never_shed() {
        let r = Registry::new(2);
        let a = admitted(r.admit(ONE));
        let b = admitted(r.admit(ONE));
        a.state.request_started();
        b.state.request_started();
        assert!(matches!(r.admit(ONE), Admission::Full));
        assert!(!a.state.is_shed() && !b.state.is_shed());
        b.state.request_finished();
        assert!(matches!(r.admit(ONE), Admission::Shed(_)));
        assert!(b.state.is_shed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_from_few_sources_sheds_its_own_connections_first() {
        let r = Registry::new(4);
        let flood = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 66));
        let lone = admitted(r.admit(ONE));
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut attackers: Vec<Admitted> = (0..3).map(|_| admitted(r.admit(flood))).collect();
        // Full. The lone client's connection is the oldest that never served, but the flood's
        // source holds three: one of those gives way, for as long as it holds the most.
        for _ in 0..5 {
            tokio::time::advance(Duration::from_millis(10)).await;
            let Admission::Shed(newcomer) = r.admit(flood) else {
                panic!("expected a shed")
            };
            assert!(
                !lone.state.is_shed(),
                "the lone client keeps its connection"
            );
            attackers.retain(|a| !a.state.is_shed());
            attackers.push(newcomer);
        }
    }

    #[test]
    fn timeouts_shorten_as_the_listener_fills() {
        let r = Registry::new(10);
        let base = Duration::from_secs(10);
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(r.admit(ONE));
        }
        assert_eq!(r.scaled(base), base, "half full: unchanged");
        for _ in 0..5 {
            held.push(r.admit(ONE));
        }
        assert_eq!(r.scaled(base), Duration::from_secs(1), "full: a tenth");
        assert_eq!(
            r.scaled(Duration::from_millis(500)),
            Duration::from_millis(500)
        );
    }
}
