//! Rate limits (governor's GCRA), with bounded memory.
//!
//! Four limiters, checked in this order:
//!
//! 1. **global**: every request, a ceiling for the whole daemon;
//! 2. **per source**, before authentication: the client address (IPv6 grouped by /64, as one host
//!    usually owns a /64). A request without credentials costs one cell up front; a request that
//!    carries credentials (the proxy's signature, a token, an instance certificate) costs
//!    nothing here when they verify, and [`RateLimitConfig::failed_auth_cost`] cells when they do
//!    not, so guessing is slow while every guest behind the metadata proxy's one address is
//!    limited on its own (per-instance) budget, never the proxy's. A source whose cells are spent
//!    is refused before authentication, credentials or not, until a cell returns;
//! 3. **per instance**, after the proxy signature verifies;
//! 4. **per project**, after a token verifies (admins are limited per token label).
//!
//! Each keyed limiter holds at most [`RateLimitConfig::max_keys`] keys: past that, every key it
//! does not track shares one overflow bucket with that limiter's quota, so filling the table with
//! distinct sources (or instances, or projects) lifts no limit: it fails closed, and a failed
//! authentication still costs its cells there. Idle keys are dropped by [`Limiters::maintain`]
//! (`retain_recent` + `shrink_to_fit`), run on a timer, which makes room for tracked keys again.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Reference;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use serde::Deserialize;

/// A sustained rate and a burst.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    /// Requests per second, sustained.
    pub per_second: NonZeroU32,
    /// Requests allowed at once after a quiet period.
    pub burst: NonZeroU32,
}

impl QuotaSpec {
    fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }
}

/// The rate-limit policy (`policy/limits.toml`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// All requests together.
    pub global: QuotaSpec,
    /// By client address, before authentication.
    pub per_source: QuotaSpec,
    /// By instance, after the proxy signature verifies.
    pub per_instance: QuotaSpec,
    /// By project (or admin token), after a token verifies.
    pub per_project: QuotaSpec,
    /// Cells a failed authentication costs its source (at least 1, at most the source burst).
    pub failed_auth_cost: NonZeroU32,
    /// Most keys each keyed limiter tracks.
    pub max_keys: usize,
    /// IPv6 sources are grouped by this prefix length (64 by default).
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
    /// Seconds between idle-key sweeps.
    #[serde(default = "default_cleanup_secs")]
    pub cleanup_interval_secs: u64,
}

fn default_ipv6_prefix() -> u8 {
    64
}
fn default_cleanup_secs() -> u64 {
    10
}

impl RateLimitConfig {
    /// Parses and checks a limits file.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        if config.failed_auth_cost > config.per_source.burst {
            return Err(format!(
                "failed_auth_cost ({}) cannot exceed per_source.burst ({})",
                config.failed_auth_cost, config.per_source.burst
            ));
        }
        if config.ipv6_prefix == 0 || config.ipv6_prefix > 128 {
            return Err("ipv6_prefix must be between 1 and 128".into());
        }
        if config.max_keys == 0 {
            return Err("max_keys must be at least 1".into());
        }
        Ok(config)
    }
}

/// A refusal: which limit, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// `global`, `source`, `instance` or `project`.
    pub limit: &'static str,
    /// Seconds until a retry can succeed, rounded up (at least 1).
    pub retry_after_secs: u64,
}

/// A keyed state store that tracks at most `cap` keys; every key it does not track is measured
/// against one shared overflow bucket, so past the cap the untracked keys together get one key's
/// budget (fail closed) instead of none being limited.
#[derive(Debug)]
pub(crate) struct BoundedStore<K: Hash + Eq + Clone> {
    inner: DashMapStateStore<K>,
    overflow: InMemoryState,
    cap: usize,
}

impl<K: Hash + Eq + Clone> BoundedStore<K> {
    fn new(cap: usize) -> Self {
        Self {
            inner: DashMapStateStore::default(),
            overflow: InMemoryState::default(),
            cap,
        }
    }
}

impl<K: Hash + Eq + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if !self.inner.contains_key(key) && self.inner.len() >= self.cap {
            return self.overflow.measure_and_replace(&NotKeyed::NonKey, f);
        }
        self.inner.measure_and_replace(key, f)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&self.inner, drop_below);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&self.inner);
    }

    fn len(&self) -> usize {
        self.inner.len()
    }

    fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

type Keyed<K, C> = RateLimiter<K, BoundedStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;
type SourceLimiter<C> = RateLimiter<IpAddr, BoundedStore<IpAddr>, C, StateInformationMiddleware>;

/// The limiters of one daemon.
pub struct Limiters<C: Clock = DefaultClock> {
    clock: C,
    global: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    source: SourceLimiter<C>,
    /// Sources whose cells are spent, refused before authentication until the instant a cell
    /// returns (so credentials, which cost nothing up front, cannot be tried meanwhile). At most
    /// `max_keys` entries; expired ones go first.
    blocked: std::sync::Mutex<std::collections::HashMap<IpAddr, C::Instant>>,
    max_keys: usize,
    /// How long one source cell takes to return.
    source_cell: Nanos,
    instance: Keyed<String, C>,
    project: Keyed<String, C>,
    failed_auth_cost: NonZeroU32,
    ipv6_prefix: u8,
    ipv6_mask: u128,
}

impl std::fmt::Debug for Limiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiters")
            .field("keys", &self.key_counts())
            .finish_non_exhaustive()
    }
}

impl Limiters<DefaultClock> {
    /// Limiters on the real clock.
    pub fn new(config: &RateLimitConfig) -> Self {
        Self::with_clock(config, DefaultClock::default())
    }
}

fn retry_after<C: Clock>(clock: &C, not_until: &governor::NotUntil<C::Instant>) -> u64 {
    whole_seconds(not_until.wait_time_from(clock.now()))
}

/// Rounds up to whole seconds, at least 1: a client retrying after Retry-After must succeed.
fn whole_seconds(wait: impl Into<Duration>) -> u64 {
    let wait: Duration = wait.into();
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

fn keyed<K: Hash + Eq + Clone, C: Clock + Clone>(
    spec: QuotaSpec,
    cap: usize,
    clock: &C,
) -> Keyed<K, C> {
    RateLimiter::new(spec.quota(), BoundedStore::new(cap), clock.clone())
}

impl<C: Clock + Clone> Limiters<C> {
    /// Limiters on `clock` (a fake clock in tests).
    pub fn with_clock(config: &RateLimitConfig, clock: C) -> Self {
        Self {
            global: RateLimiter::direct_with_clock(config.global.quota(), clock.clone()),
            source: Keyed::<IpAddr, C>::new(
                config.per_source.quota(),
                BoundedStore::new(config.max_keys),
                clock.clone(),
            )
            .with_middleware::<StateInformationMiddleware>(),
            blocked: std::sync::Mutex::default(),
            max_keys: config.max_keys,
            source_cell: Nanos::from(config.per_source.quota().replenish_interval()),
            instance: keyed(config.per_instance, config.max_keys, &clock),
            project: keyed(config.per_project, config.max_keys, &clock),
            failed_auth_cost: config.failed_auth_cost,
            ipv6_prefix: config.ipv6_prefix,
            ipv6_mask: u128::MAX << (128 - u32::from(config.ipv6_prefix.clamp(1, 128))),
            clock,
        }
    }

    /// The IPv6 prefix length sources are grouped by.
    pub fn ipv6_prefix(&self) -> u8 {
        self.ipv6_prefix
    }

    /// The key a source address is limited under: IPv4 as is, IPv6 by its prefix (an IPv4-mapped
    /// IPv6 address counts as its IPv4 address).
    pub fn source_key(&self, addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(_) => addr,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & self.ipv6_mask).into()),
            },
        }
    }

    /// The checks before authentication: the global ceiling, whether the source's cells are
    /// spent, and, for a request without credentials (`credentialed` false), its own cell.
    pub fn before_auth(&self, source: IpAddr, credentialed: bool) -> Result<(), Limited> {
        self.global.check().map_err(|n| Limited {
            limit: "global",
            retry_after_secs: retry_after(&self.clock, &n),
        })?;
        let key = self.source_key(source);
        let now = self.clock.now();
        if let Some(until) = self.blocked_until(&key, now) {
            return Err(Limited {
                limit: "source",
                retry_after_secs: whole_seconds(until.duration_since(now)),
            });
        }
        if credentialed {
            return Ok(());
        }
        match self.source.check_key(&key) {
            Ok(_) => Ok(()),
            Err(n) => {
                self.block(key, n.earliest_possible(), now);
                Err(Limited {
                    limit: "source",
                    retry_after_secs: retry_after(&self.clock, &n),
                })
            }
        }
    }

    /// Charges a failed authentication (credentials that did not verify, or malformed ones) to
    /// its source: `failed_auth_cost` cells in all, one fewer when the request already paid its
    /// cell before authentication (`prepaid`). A source left without cells is refused before
    /// authentication until one returns.
    pub fn failed_auth(&self, source: IpAddr, prepaid: bool) {
        let cost = self.failed_auth_cost.get() - u32::from(prepaid);
        let Some(cost) = NonZeroU32::new(cost) else {
            return;
        };
        let key = self.source_key(source);
        let now = self.clock.now();
        match self.source.check_key_n(&key, cost) {
            Ok(Ok(left)) if left.remaining_burst_capacity() > 0 => {}
            Ok(Ok(_)) => self.block(key, now + self.source_cell, now),
            Ok(Err(n)) => self.block(key, n.earliest_possible(), now),
            // failed_auth_cost is checked against the burst at load; this cannot happen.
            Err(_) => self.block(key, now + self.source_cell, now),
        }
    }

    fn blocked_until(&self, key: &IpAddr, now: C::Instant) -> Option<C::Instant> {
        let mut blocked = self
            .blocked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match blocked.get(key) {
            Some(until) if *until > now => Some(*until),
            Some(_) => {
                blocked.remove(key);
                None
            }
            None => None,
        }
    }

    fn block(&self, key: IpAddr, until: C::Instant, now: C::Instant) {
        let mut blocked = self
            .blocked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if blocked.len() >= self.max_keys && !blocked.contains_key(&key) {
            blocked.retain(|_, u| *u > now);
            if blocked.len() >= self.max_keys {
                // Full of live blocks: this source is still limited by its (or the overflow)
                // bucket on its next failure.
                return;
            }
        }
        blocked.insert(key, until);
    }

    /// The check after an instance is identified.
    pub fn instance(&self, instance_id: &str) -> Result<(), Limited> {
        self.instance
            .check_key(&instance_id.to_owned())
            .map_err(|n| Limited {
                limit: "instance",
                retry_after_secs: retry_after(&self.clock, &n),
            })
    }

    /// The check after a token is identified (`key`: its project, or `admin:<label>`).
    pub fn project(&self, key: &str) -> Result<(), Limited> {
        self.project
            .check_key(&key.to_owned())
            .map_err(|n| Limited {
                limit: "project",
                retry_after_secs: retry_after(&self.clock, &n),
            })
    }

    /// Drops keys whose buckets are back to full and releases the memory.
    pub fn maintain(&self) {
        let now = self.clock.now();
        self.blocked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, until| *until > now);
        self.source.retain_recent();
        self.source.shrink_to_fit();
        self.instance.retain_recent();
        self.instance.shrink_to_fit();
        self.project.retain_recent();
        self.project.shrink_to_fit();
    }

    /// Keys held by the source, instance and project limiters.
    pub fn key_counts(&self) -> (usize, usize, usize) {
        (self.source.len(), self.instance.len(), self.project.len())
    }
}

/// Caps the connections one source may hold at once.
///
/// Memory is bounded by the number of open connections: a source's entry goes when its last
/// connection closes.
#[derive(Debug)]
pub(crate) struct ConnectionCaps {
    per_source: usize,
    ipv6_mask: u128,
    open: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
}

/// One admitted connection; releases its place when dropped.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    caps: std::sync::Arc<ConnectionCaps>,
    key: IpAddr,
}

impl ConnectionCaps {
    /// At most `per_source` connections per source (IPv6 grouped by `ipv6_prefix`).
    pub(crate) fn new(per_source: usize, ipv6_prefix: u8) -> Self {
        Self {
            per_source: per_source.max(1),
            ipv6_mask: u128::MAX << (128 - u32::from(ipv6_prefix.clamp(1, 128))),
            open: std::sync::Mutex::default(),
        }
    }

    /// A slot for a new connection from `source`, or `None` if it already holds its share.
    pub(crate) fn admit(self: &std::sync::Arc<Self>, source: IpAddr) -> Option<ConnectionSlot> {
        let key = match source {
            IpAddr::V4(_) => source,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & self.ipv6_mask).into()),
            },
        };
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(key).or_default();
        if *count >= self.per_source {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            caps: self.clone(),
            key,
        })
    }

    /// Sources currently holding connections (the tests' view of the map's bound).
    #[cfg(test)]
    pub(crate) fn sources(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self
            .caps
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// How often [`Limiters::maintain`] should run.
pub(crate) fn cleanup_interval(config: &RateLimitConfig) -> Duration {
    Duration::from_secs(config.cleanup_interval_secs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::net::Ipv4Addr;

    fn config(max_keys: usize) -> RateLimitConfig {
        RateLimitConfig::from_toml(&format!(
            "global = {{ per_second = 1000000, burst = 1000000 }}\n\
             per_source = {{ per_second = 1, burst = 10 }}\n\
             per_instance = {{ per_second = 1, burst = 3 }}\n\
             per_project = {{ per_second = 2, burst = 5 }}\n\
             failed_auth_cost = 5\nmax_keys = {max_keys}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_source_gets_its_burst_then_waits() {
        let clock = FakeRelativeClock::default();
        let l = Limiters::with_clock(&config(100), clock.clone());
        let a: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        for _ in 0..10 {
            assert_eq!(l.before_auth(a, false), Ok(()));
        }
        let refused = l.before_auth(a, false).unwrap_err();
        assert_eq!(refused.limit, "source");
        assert_eq!(refused.retry_after_secs, 1);
        // Another source is unaffected.
        assert_eq!(
            l.before_auth(Ipv4Addr::new(10, 0, 0, 2).into(), false),
            Ok(())
        );
        clock.advance(Duration::from_secs(1));
        assert_eq!(l.before_auth(a, false), Ok(()));
    }

    #[test]
    fn failed_authentications_cost_more() {
        let clock = FakeRelativeClock::default();
        let l = Limiters::with_clock(&config(100), clock.clone());
        let a: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        // A request with credentials costs nothing up front; each failure costs 5 (of 10).
        l.before_auth(a, true).unwrap();
        l.failed_auth(a, false);
        l.before_auth(a, true).unwrap();
        l.failed_auth(a, false);
        // Spent: refused before authentication, with or without credentials.
        assert_eq!(l.before_auth(a, true).unwrap_err().limit, "source");
        let refused = l.before_auth(a, false).unwrap_err();
        // 10 cells spent at 1/s: the next one is 1 s away... and the debt makes it more.
        assert!(refused.retry_after_secs >= 1);
        clock.advance(Duration::from_secs(1));
        assert!(l.before_auth(a, false).is_ok());
    }

    #[test]
    fn ipv6_sources_are_grouped_by_64() {
        let l = Limiters::new(&config(100));
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(l.source_key(a), l.source_key(b));
        assert_ne!(l.source_key(a), l.source_key(c));
        let mapped: IpAddr = Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().into();
        assert_eq!(
            l.source_key(mapped),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
        );
        for _ in 0..10 {
            l.before_auth(a, false).unwrap();
        }
        assert!(l.before_auth(b, false).is_err(), "same /64, same bucket");
        assert!(l.before_auth(c, false).is_ok());
    }

    #[test]
    fn instance_and_project_limits() {
        let l = Limiters::new(&config(100));
        for _ in 0..3 {
            l.instance("i-1").unwrap();
        }
        assert_eq!(l.instance("i-1").unwrap_err().limit, "instance");
        assert!(l.instance("i-2").is_ok());
        for _ in 0..5 {
            l.project("project-a").unwrap();
        }
        assert_eq!(l.project("project-a").unwrap_err().limit, "project");
    }

    #[test]
    fn a_million_distinct_sources_stay_bounded_and_the_global_limit_still_applies() {
        let clock = FakeRelativeClock::default();
        let mut cfg = config(10_000);
        cfg.global = QuotaSpec {
            per_second: NonZeroU32::new(1).unwrap(),
            burst: NonZeroU32::new(50_000).unwrap(),
        };
        let l = Limiters::with_clock(&cfg, clock.clone());
        let mut allowed = 0u32;
        for i in 0..1_000_000u32 {
            let source = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            if l.before_auth(source, false).is_ok() {
                allowed += 1;
            }
            assert!(
                l.key_counts().0 <= 10_000 + 8,
                "key count must stay bounded"
            );
        }
        assert!(l.key_counts().0 <= 10_000 + 8);
        // The first 10,000 sources are tracked (one request each); the other 990,000 share one
        // overflow bucket (burst 10): filling the table lifts no limit.
        assert_eq!(
            allowed,
            10_000 + 10,
            "past the key cap, untracked sources share one bucket"
        );
        // Once the buckets are full again, the sweep empties the map.
        clock.advance(Duration::from_secs(60));
        l.maintain();
        assert_eq!(l.key_counts().0, 0);

        // The global ceiling still applies below the key cap.
        cfg.global.burst = NonZeroU32::new(5_000).unwrap();
        let l = Limiters::with_clock(&cfg, clock.clone());
        let allowed = (0..10_000u32)
            .filter(|i| {
                l.before_auth(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), false)
                    .is_ok()
            })
            .count();
        assert_eq!(allowed, 5_000, "the global limiter decides");
    }

    #[test]
    fn failed_authentications_past_the_key_cap_still_cost() {
        let clock = FakeRelativeClock::default();
        let l = Limiters::with_clock(&config(1), clock.clone());
        let tracked: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        l.before_auth(tracked, false).unwrap();
        // Two untracked sources share one bucket (burst 10): a's failure costs it 5 cells, so b
        // gets the other 5.
        let (a, b): (IpAddr, IpAddr) = (
            Ipv4Addr::new(10, 0, 0, 2).into(),
            Ipv4Addr::new(10, 0, 0, 3).into(),
        );
        l.before_auth(a, true).unwrap();
        l.failed_auth(a, false);
        for _ in 0..5 {
            l.before_auth(b, false).unwrap();
        }
        assert_eq!(l.before_auth(b, false).unwrap_err().limit, "source");
        assert_eq!(l.key_counts().0, 1, "only the first source is tracked");
    }

    #[test]
    fn connection_caps_are_per_source_and_released() {
        let caps = std::sync::Arc::new(ConnectionCaps::new(2, 64));
        let a: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let one = caps.admit(a).unwrap();
        let two = caps.admit(a).unwrap();
        assert!(caps.admit(a).is_none());
        assert!(caps.admit(Ipv4Addr::new(10, 0, 0, 2).into()).is_some());
        drop(one);
        let three = caps.admit(a).unwrap();
        drop((two, three));
        assert_eq!(caps.sources(), 0, "entries go with their last connection");
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        let _x = caps.admit(v6a).unwrap();
        let _y = caps.admit(v6b).unwrap();
        assert!(caps.admit(v6a).is_none(), "one /64, one share");
    }

    #[test]
    fn config_validation() {
        assert!(RateLimitConfig::from_toml("global = 1").is_err());
        let text = "global = { per_second = 1, burst = 1 }\nper_source = { per_second = 1, burst = 2 }\n\
                    per_instance = { per_second = 1, burst = 1 }\nper_project = { per_second = 1, burst = 1 }\n\
                    failed_auth_cost = 3\nmax_keys = 10\n";
        assert!(
            RateLimitConfig::from_toml(text)
                .unwrap_err()
                .contains("failed_auth_cost")
        );
        assert!(RateLimitConfig::from_toml(&text.replace("burst = 2", "burst = 0")).is_err());
    }
}
