//! `[[listener]]`: the sockets, what each serves, and whom each believes.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use super::{ConfigError, err};
use crate::surface::Surface;

/// Whether a TLS listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// No client certificates.
    None,
    /// A client may present a certificate from the client CA; one that does not verify fails the
    /// handshake.
    Optional,
    /// Every client must present a certificate from the client CA.
    Required,
}

/// One listening socket and what it serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// A name for logs and audit events.
    pub name: String,
    /// The address to bind.
    pub address: SocketAddr,
    /// TLS (`true`), or plain HTTP, allowed only for an ops-only listener on loopback.
    #[serde(default = "default_true")]
    pub tls: bool,
    /// The API surfaces answered here (`instance`, `compute`, `admin`, `ops`); others are 404.
    pub serves: Vec<Surface>,
    /// Client certificates on this listener.
    #[serde(default = "default_client_auth")]
    pub client_auth: ClientAuth,
    /// Expect a HAProxy PROXY protocol v2 header from a trusted proxy before TLS.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Peers whose `Forwarded`/`X-Forwarded-For` headers (and PROXY headers) are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The one header this listener's trusted proxies set to name the client; the other is
    /// never believed.
    #[serde(default)]
    pub client_ip_header: ClientIpHeader,
    /// The most connections this listener holds (default `[limits] max_connections`); each
    /// listener has its own, so one network cannot exhaust another's.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// The most connections one source holds on this listener (default `[limits]
    /// max_connections_per_source`).
    #[serde(default)]
    pub max_connections_per_source: Option<usize>,
}

/// Which forwarding header a listener's trusted proxies set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ClientIpHeader {
    /// `X-Forwarded-For` (the Neutron/OVN metadata agents, HAProxy's `option forwardfor`,
    /// nginx's `real_ip_header` default).
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// RFC 7239 `Forwarded`.
    #[serde(rename = "forwarded")]
    Forwarded,
}

fn default_true() -> bool {
    true
}

fn default_client_auth() -> ClientAuth {
    ClientAuth::None
}

impl ListenerConfig {
    /// Whether `peer` is a trusted proxy of this listener (an IPv4-mapped IPv6 address counts as
    /// its IPv4 address).
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        let peer = match peer {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }

    /// Whether this listener answers `surface`.
    pub fn serves(&self, surface: Surface) -> bool {
        self.serves.contains(&surface)
    }
}

/// Checks the listeners: at least one, unique names, known surfaces, plain HTTP only for an
/// ops-only listener on loopback, client certificates only with a client CA, PROXY protocol only
/// from trusted proxies.
pub(super) fn validate_listeners(
    path: &Path,
    listeners: &[ListenerConfig],
    has_client_ca: bool,
) -> Result<(), ConfigError> {
    if listeners.is_empty() {
        return Err(err(path, "at least one [[listener]] is needed"));
    }
    let mut names = std::collections::HashSet::new();
    for l in listeners {
        let named = |m: &str| err(path, format!("listener {:?}: {m}", l.name));
        if !names.insert(l.name.as_str()) {
            return Err(named("the name is used twice"));
        }
        if l.serves.is_empty() || l.serves.contains(&Surface::Unknown) {
            return Err(named(
                "serves must list some of instance, compute, admin, ops",
            ));
        }
        if !l.tls && (!l.address.ip().is_loopback() || l.serves.iter().any(|s| *s != Surface::Ops))
        {
            return Err(named(
                "plain HTTP (tls = false) is only for an ops-only listener on a loopback address",
            ));
        }
        if !l.tls && l.client_auth != ClientAuth::None {
            return Err(named("client_auth needs tls = true"));
        }
        if l.client_auth != ClientAuth::None && !has_client_ca {
            return Err(named("client_auth needs [tls] client_ca"));
        }
        if l.proxy_protocol && l.trusted_proxies.is_empty() {
            return Err(named(
                "proxy_protocol needs trusted_proxies (only they may send PROXY headers)",
            ));
        }
    }
    Ok(())
}
