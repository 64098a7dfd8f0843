//! Who the client is, behind load balancers and proxies.
//!
//! A listener lists its trusted proxies and names the one header they set
//! (`client_ip_header`: `X-Forwarded-For` by default, as the Neutron/OVN agents and nginx's
//! `real_ip_header` use it, or RFC 7239 `Forwarded`). When the peer (the TCP peer, or the source
//! of a PROXY v2 header) is a trusted proxy, that header is believed: walking from the nearest hop
//! outwards, the first address that is not itself a trusted proxy is the client. The other header
//! is never believed, whoever sends it: a proxy that appends `X-Forwarded-For` passes a client's
//! own `Forwarded` through untouched, and that must not choose the audited source or dodge the
//! per-source limit. When the peer is not trusted, both are ignored (and the audit event says so):
//! anyone can write them. The client address is used for the audit log and the
//! pre-authentication rate limit, never for identity.

use std::net::IpAddr;

use forwarded_header_value::ForwardedHeaderValue;
use http::HeaderMap;

use crate::config::{ClientIpHeader, ListenerConfig};

/// The most hops accepted in a forwarding header.
pub(crate) const MAX_HOPS: usize = 16;

/// What became of the forwarding headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// None were sent.
    None,
    /// Sent by a trusted proxy and used.
    Trusted,
    /// Sent by a peer that is not a trusted proxy, and ignored.
    IgnoredUntrustedPeer,
}

/// The resolved client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    /// The client's address.
    pub client: IpAddr,
    /// Every address the forwarding header named, remotest first (when trusted).
    pub chain: Vec<IpAddr>,
    /// What became of the forwarding headers.
    pub verdict: Verdict,
    /// The header as received when it was ignored (for the audit event).
    pub ignored: Option<String>,
}

/// A trusted proxy sent a forwarding header that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Malformed(pub &'static str);

fn joined(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// Resolves the client of a request from `peer` on `listener`.
pub(crate) fn resolve(
    listener: &ListenerConfig,
    peer: IpAddr,
    headers: &HeaderMap,
) -> Result<Source, Malformed> {
    let (used, other) = match listener.client_ip_header {
        ClientIpHeader::XForwardedFor => ("x-forwarded-for", "forwarded"),
        ClientIpHeader::Forwarded => ("forwarded", "x-forwarded-for"),
    };
    let value = joined(headers, used);
    // The header this listener's proxies do not set is a client's own: kept for the audit
    // event, believed never.
    let unbelieved = joined(headers, other).map(|raw| crate::text::bounded(&raw));
    let direct = Source {
        client: peer,
        chain: Vec::new(),
        verdict: Verdict::None,
        ignored: unbelieved,
    };
    let Some(value) = value else {
        return Ok(direct);
    };
    if !listener.trusts(peer) {
        return Ok(Source {
            verdict: Verdict::IgnoredUntrustedPeer,
            ignored: Some(crate::text::bounded(&value)),
            ..direct
        });
    }
    let parsed = match listener.client_ip_header {
        ClientIpHeader::Forwarded => ForwardedHeaderValue::from_forwarded(&value)
            .map_err(|_| Malformed("Forwarded is not a valid RFC 7239 header."))?,
        ClientIpHeader::XForwardedFor => ForwardedHeaderValue::from_x_forwarded_for(&value)
            .map_err(|_| Malformed("X-Forwarded-For is not a list of at most 16 IP addresses."))?,
    };
    if parsed.len() > MAX_HOPS {
        return Err(Malformed("The forwarding header names more than 16 hops."));
    }
    let hops: Vec<Option<IpAddr>> = parsed
        .iter()
        .map(|stanza| stanza.forwarded_for_ip())
        .collect();
    let chain: Vec<IpAddr> = hops.iter().flatten().copied().collect();
    // Nearest hop first: the first address not itself a trusted proxy is the client. An
    // obfuscated or unknown hop ends the walk; the last address known is then the client.
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop {
            Some(ip) => {
                client = *ip;
                if !listener.trusts(*ip) {
                    break;
                }
            }
            None => break,
        }
    }
    Ok(Source {
        client,
        chain,
        verdict: Verdict::Trusted,
        ignored: direct.ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn listener(trusted: &[&str]) -> ListenerConfig {
        listener_with(trusted, "x-forwarded-for")
    }

    fn listener_with(trusted: &[&str], header: &str) -> ListenerConfig {
        toml::from_str(&format!(
            "name = \"t\"\naddress = \"127.0.0.1:0\"\nserves = [\"instance\"]\nclient_ip_header = \"{header}\"\ntrusted_proxies = [{}]",
            trusted.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(",")
        ))
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn direct_clients_are_their_peer() {
        let l = listener(&["10.0.0.0/8"]);
        let s = resolve(&l, ip("192.0.2.1"), &HeaderMap::new()).unwrap();
        assert_eq!((s.client, s.verdict), (ip("192.0.2.1"), Verdict::None));
    }

    #[test]
    fn untrusted_peers_cannot_forward() {
        let l = listener(&["10.0.0.0/8"]);
        let s = resolve(
            &l,
            ip("192.0.2.1"),
            &headers(&[("x-forwarded-for", "203.0.113.9")]),
        )
        .unwrap();
        assert_eq!(s.client, ip("192.0.2.1"));
        assert_eq!(s.verdict, Verdict::IgnoredUntrustedPeer);
        assert_eq!(s.ignored.as_deref(), Some("203.0.113.9"));
        // Even garbage is just ignored: it proves nothing about anyone.
        assert!(
            resolve(
                &l,
                ip("192.0.2.1"),
                &headers(&[("x-forwarded-for", "not an ip")])
            )
            .is_ok()
        );
    }

    #[test]
    fn trusted_chains_are_walked_from_the_nearest_hop() {
        let l = listener(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "198.51.100.7, 203.0.113.9, 10.1.1.1")]);
        let s = resolve(&l, ip("10.0.0.2"), &h).unwrap();
        assert_eq!(
            s.client,
            ip("203.0.113.9"),
            "a spoofed leftmost entry does not win"
        );
        assert_eq!(s.chain.len(), 3);
        assert_eq!(s.verdict, Verdict::Trusted);
        let all_trusted = headers(&[("x-forwarded-for", "10.9.9.9, 10.1.1.1")]);
        assert_eq!(
            resolve(&l, ip("10.0.0.2"), &all_trusted).unwrap().client,
            ip("10.9.9.9")
        );
    }

    #[test]
    fn only_the_configured_header_is_believed() {
        let both = headers(&[
            (
                "forwarded",
                "for=192.0.2.60;proto=https, for=\"[2001:db8::1]:4711\"",
            ),
            ("x-forwarded-for", "198.51.100.1"),
        ]);
        // The default: X-Forwarded-For, as the Neutron/OVN agents set it; a client's Forwarded
        // passed through by the proxy chooses nothing, and is kept for the audit event.
        let xff = listener(&["10.0.0.0/8"]);
        let s = resolve(&xff, ip("10.0.0.2"), &both).unwrap();
        assert_eq!(s.client, ip("198.51.100.1"));
        assert!(s.ignored.as_deref().unwrap().contains("192.0.2.60"));
        let only_forwarded = headers(&[("forwarded", "for=192.0.2.60")]);
        let s = resolve(&xff, ip("10.0.0.2"), &only_forwarded).unwrap();
        assert_eq!((s.client, s.verdict), (ip("10.0.0.2"), Verdict::None));
        // Configured for Forwarded: the reverse.
        let fwd = listener_with(&["10.0.0.0/8"], "forwarded");
        assert_eq!(
            resolve(&fwd, ip("10.0.0.2"), &both).unwrap().client,
            ip("2001:db8::1")
        );
        let hidden = headers(&[("forwarded", "for=192.0.2.60, for=_hidden")]);
        assert_eq!(
            resolve(&fwd, ip("10.0.0.2"), &hidden).unwrap().client,
            ip("10.0.0.2")
        );
    }

    #[test]
    fn malformed_headers_from_trusted_proxies_are_errors() {
        let l = listener(&["127.0.0.1/32"]);
        // (Empty list elements, as in "1.2.3.4,,", are allowed by RFC 9110's list syntax.)
        for bad in ["not-an-ip", "10.0.0.1:80", ""] {
            assert!(
                resolve(&l, ip("127.0.0.1"), &headers(&[("x-forwarded-for", bad)])).is_err(),
                "{bad}"
            );
        }
        let many = vec!["192.0.2.1"; 17].join(",");
        assert!(resolve(&l, ip("127.0.0.1"), &headers(&[("x-forwarded-for", &many)])).is_err());
        let fwd = listener_with(&["127.0.0.1/32"], "forwarded");
        assert!(resolve(&fwd, ip("127.0.0.1"), &headers(&[("forwarded", "for")])).is_err());
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_networks() {
        let l = listener(&["127.0.0.1/32"]);
        let mapped = ip("::ffff:127.0.0.1");
        let s = resolve(&l, mapped, &headers(&[("x-forwarded-for", "192.0.2.5")])).unwrap();
        assert_eq!(s.client, ip("192.0.2.5"));
    }
}
