//! The HTTP face of metapass: one request's path through `exchange` (begin, finish, exactly one
//! event), `router` (surface, pre-authentication checks), a surface's handler, `caller` (the
//! identity step's verdict made into facts and limits) and [`respond`] (the one place outcomes
//! become answers).

pub(crate) mod admin;
pub(crate) mod body;
pub(crate) mod caller;
pub(crate) mod compute;
pub(crate) mod exchange;
pub(crate) mod health;
pub(crate) mod keys;
pub(crate) mod metadata;
pub mod respond;
pub(crate) mod router;

use bytes::Bytes;

pub use exchange::{ConnInfo, Exchange, audit_unparsed_request, flush_refusals, serve};
pub use router::StreamsExceeded;

/// A request body the handlers can read: hyper's `Incoming` on the wire, `Full<Bytes>` in fuzz
/// targets and benchmarks.
pub trait RequestBody:
    hyper::body::Body<Data = Bytes, Error: std::error::Error + Send + Sync + 'static>
    + Send
    + Unpin
    + 'static
{
}

impl<B> RequestBody for B where
    B: hyper::body::Body<Data = Bytes, Error: std::error::Error + Send + Sync + 'static>
        + Send
        + Unpin
        + 'static
{
}
