//! `[limits]`: bounds on connections and requests.

use std::time::Duration;

use serde::Deserialize;

/// Bounds on connections and requests. Each has a documented default (README, "Bounds").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections each listener holds at once (unless the listener sets its own); when full, a
    /// new connection sheds one that serves nobody, or is closed (see `server::pressure`).
    pub max_connections: usize,
    /// Connections one source address (IPv6: one /64) may hold at once on each listener; more are
    /// closed at accept.
    pub max_connections_per_source: usize,
    /// Seconds allowed for the TLS handshake.
    pub tls_handshake_timeout_secs: u64,
    /// Seconds from accept to the first request's head (PROXY header, TLS handshake and protocol
    /// detection included); shortened as a listener fills.
    pub first_request_timeout_secs: u64,
    /// Seconds a connection may wait between requests (HTTP/1 keep-alive, HTTP/2 with no open
    /// stream, whatever the client does with pings); shortened as a listener fills.
    pub idle_timeout_secs: u64,
    /// Seconds allowed to receive a request's headers.
    pub header_read_timeout_secs: u64,
    /// Seconds allowed to receive a request's body.
    pub body_read_timeout_secs: u64,
    /// Seconds allowed for a whole request, from its first byte to the answer.
    pub request_timeout_secs: u64,
    /// Most header fields in one HTTP/1 request.
    pub max_headers: usize,
    /// Largest HTTP/1 read buffer (bounds the request line plus headers), in bytes.
    pub max_header_bytes: usize,
    /// Most concurrent HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// Most HTTP/2 streams reset by the client but not yet accepted (the "rapid reset" bound).
    pub h2_max_pending_reset_streams: usize,
    /// Largest HTTP/2 header list, in bytes.
    pub h2_max_header_list_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_source: 256,
            tls_handshake_timeout_secs: 10,
            first_request_timeout_secs: 15,
            idle_timeout_secs: 30,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 10,
            request_timeout_secs: 30,
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            h2_max_concurrent_streams: 64,
            h2_max_pending_reset_streams: 20,
            h2_max_header_list_bytes: 16 * 1024,
        }
    }
}

impl Limits {
    /// The TLS handshake deadline.
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.tls_handshake_timeout_secs)
    }
    /// The deadline from accept to the first request.
    pub fn first_request_timeout(&self) -> Duration {
        Duration::from_secs(self.first_request_timeout_secs.max(1))
    }
    /// How long a connection may idle between requests.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }
    /// The header read deadline.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }
    /// The body read deadline.
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_secs(self.body_read_timeout_secs)
    }
    /// The whole-request deadline.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}
