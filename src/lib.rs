//! metapass: OpenStack Nova's instance password service, done right.
//!
//! A guest posts its RSA-encrypted password once to `POST /openstack/{version}/password` (through the
//! Neutron/OVN metadata proxy, which signs the instance id); the project owner later reads or clears it
//! through the compute API. metapass keeps that secret sealed with AES-256-GCM in a chunked metadata
//! store, answers only the instance itself and its project, and writes one audit event for every
//! request.
//!
//! One request, front to back (see `ARCHITECTURE.md` in the shared docs):
//!
//! ```text
//! server (accept, per-listener caps and shedding, first-request and idle timers, TLS, hyper bounds)
//!  -> api::Exchange (request id, source, TLS facts, deadline)  ... the audit event begins here
//!  -> pre-auth limit (credentials that verify cost nothing; refusals counted in aggregates)
//!  -> api router -> identity (who: certificate, proxy signature, token file, Keystone)
//!  -> policy (may they) -> handler (bounded body, validation)
//!  -> store (registry + sealed chunks, atomic set-once) with crypto sealing/opening
//!  -> audit (exactly one event, durable before a mutation is acknowledged) -> response
//! ```
//!
//! Module map:
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | typed configuration; every file and secret is read and validated here, at load |
//! | [`server`] | accept loops, per-listener caps and shedding ([`server::pressure`]), first-request and idle timers, graceful shutdown |
//! | [`tls`] | rustls server configuration (ring provider), client-certificate verifier, PEM loading, reload on SIGHUP |
//! | [`identity`] | who is calling: client certificates, signed proxy headers, the token file, Keystone tokens ([`identity::keystone`]); no policy decisions |
//! | [`microversion`] | the compute API microversion a request asks for, read as Nova reads it |
//! | [`forwarded`] | the client behind trusted proxies (`Forwarded`, `X-Forwarded-For`) |
//! | [`policy`] | may this caller do this action to this instance |
//! | [`api`] | routes and handlers; [`api::respond`] is the one place errors become answers |
//! | [`store`] | the [`store::Store`] trait: registry, chunked sealed values, atomic set-once; SQLite (embedded) and PostgreSQL (replicas) backends |
//! | [`crypto`] | keyring and AES-256-GCM seal/open with the record bound in the AAD; key check values |
//! | [`keys`] | keyring sources (file, environment, descriptor) and keyring files: generate, rotate, retire, atomic replace |
//! | [`api::keys`] | the keyring in use: startup check, reload, key status, the background rewrap |
//! | [`hygiene`] | process hardening before secrets are read: no core dumps, not dumpable |
//! | [`audit`] | the OCSF event, the chained durable writer, signed checkpoints, the store anchor, verification, reconciliation |
//! | [`ids`] | validated identifiers (instance, project, request) |
//! | [`limits`] | rate limits with bounded key memory |
//! | [`metrics`] | Prometheus metrics |
//! | [`nova`] | living beside Nova: `import-nova` from its database, registry sync from its notifications, registry lookups |
//! | [`devcerts`] | the development certificate authority (never for production) |
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod app;
pub mod audit;
pub mod background;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod devcerts;
pub mod forwarded;
pub mod hygiene;
pub mod identity;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod microversion;
pub mod nova;
pub mod policy;
pub mod server;
pub mod store;
pub mod surface;
pub mod text;
pub mod tls;

/// The product name written into audit events and the `Server` header.
pub const PRODUCT_NAME: &str = "metapass";

/// The product version, from `Cargo.toml`.
pub const PRODUCT_VERSION: &str = env!("CARGO_PKG_VERSION");
