//! metapass: OpenStack Nova's instance password service, done right.
//!
//! A guest posts its RSA-encrypted password once to `POST /openstack/{version}/password` (through the
//! Neutron/OVN metadata proxy, which signs the instance id); the project owner later reads or clears it
//! through the compute API. metapass keeps that secret sealed with AES-256-GCM in a chunked metadata
//! store, answers only the instance itself and its project, and writes one audit event for every
//! request.
//!
//! One request, front to back (the shape of `ARCHITECTURE.md` in the shared docs), each step the
//! function that does it, each file left for good once the next step begins:
//!
//! ```text
//! server::run -> accept (per-listener and per-source caps, shedding: server::pressure)
//!  -> TLS handshake (tls), HTTP (hyper, with header, idle and first-request timers)
//!  -> api::exchange::serve -> handle -> begin      request id, source, TLS facts, deadline: the event begins
//!  -> api::router::route                           surface (one table: SURFACES), client behind proxies,
//!                                                  pre-auth limit, listener's surfaces, framing
//!  -> api::{metadata, compute, admin, health, keys}::handle
//!       -> api::caller::{identify_instance, authenticate_token}
//!            -> identity::authenticate::Identities::{instance, token} (certificate | proxy signature | token file | Keystone)
//!            -> post-auth limit (instance, project or admin)
//!       -> api::exchange::Exchange::authorize -> policy::Policy::decide (404 across projects)
//!       -> api::body::read_limited, validation
//!       -> store::Store (rules in store::rules; crypto seals, store::PasswordRecord::open opens)
//!       -> audit::gate::gated                      a mutation's event durable before the commit
//!  -> api::respond                                 every error becomes its answer here (From impls)
//!  -> api::exchange::finish                        exactly one event (or the gate's), then the answer
//! ```
//!
//! Module map:
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | the command line (`main.rs` only calls [`cli::main`]) |
//! | [`app`] | the composition root: [`app::App`] built from a [`config::Config`] |
//! | `background` | the daemon's background tasks, started in one place |
//! | [`config`] | typed configuration by section; every file and secret is read and validated here, at load |
//! | `server` | accept loops, per-listener caps and shedding (`server::pressure`), first-request and idle timers, graceful shutdown |
//! | `tls` | rustls server configuration (ring provider), client-certificate verifier, PEM loading, reload on SIGHUP |
//! | [`identity`] | who is calling ([`identity::authenticate`]): client certificates, signed proxy headers, the token file, Keystone tokens; no HTTP, no policy |
//! | `microversion` | the compute API microversion a request asks for, read as Nova reads it |
//! | `forwarded` | the client behind trusted proxies (`Forwarded`, `X-Forwarded-For`) |
//! | [`policy`] | may this caller do this action to this instance |
//! | [`api`] | the exchange, the router, the caller step, the handlers; [`api::respond`] is the one place errors become answers |
//! | [`store`] | the [`store::Store`] trait and its rules ([`store::rules`]); SQLite (embedded) and PostgreSQL (replicas) hold the SQL |
//! | [`crypto`] | keyring and AES-256-GCM seal/open with the record bound in the AAD; key check values |
//! | `keys` | the data keys' lifecycle: keyring files, the keyring in use, the background rewrap |
//! | `hygiene` | process hardening before secrets are read: no core dumps, not dumpable |
//! | [`audit`] | the OCSF event, the gate, the chained durable writer, signed checkpoints, the store anchor, verification, reconciliation |
//! | [`clock`] | where "now" comes from; clippy refuses the system clocks elsewhere |
//! | [`ids`] | validated identifiers (instance, project, request) |
//! | `surface`, `text` | the API surfaces; attacker-controlled text kept to a bound |
//! | `limits` | rate limits with bounded key memory |
//! | [`metrics`] | Prometheus metrics |
//! | `nova` | living beside Nova: `import-nova` from its database, registry sync from its notifications, registry lookups |
//! | `devcerts` | the development certificate authority (never for production) |
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(unreachable_pub)]

pub mod api;
pub mod app;
pub mod audit;
mod background;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
mod devcerts;
mod forwarded;
mod hygiene;
pub mod identity;
pub mod ids;
mod keys;
mod limits;
pub mod metrics;
mod microversion;
mod nova;
pub mod policy;
mod server;
pub mod store;
mod surface;
mod text;
mod tls;

// What the binary, the fuzz targets and the benchmarks use from modules that are otherwise the
// crate's own.
pub use keys::state::load_at_startup as load_keyring_at_startup;

/// The product name written into audit events and the `Server` header.
pub const PRODUCT_NAME: &str = "metapass";

/// The product version, from `Cargo.toml`.
pub const PRODUCT_VERSION: &str = env!("CARGO_PKG_VERSION");
