//! The API surfaces: what a request reached, what a listener serves, what an audit event names.
//! Its own module because configuration, routing and the audit event all speak of it and none of
//! them owns it.

use serde::Serialize;

/// Which API surface a request reached (and, in configuration, which surfaces a listener serves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Surface {
    /// The instance-facing metadata password API.
    Instance,
    /// The owner-facing compute API subset.
    Compute,
    /// The admin API.
    Admin,
    /// Health and metrics.
    Ops,
    /// No route matched.
    Unknown,
}
