//! TLS: rustls with the ring provider only.
//!
//! TLS 1.3 and 1.2 with the provider's AEAD suites (AES-GCM, ChaCha20-Poly1305; rustls implements
//! no CBC, no RC4, no renegotiation), ALPN `h2` and `http/1.1`, stateless session tickets whose key
//! rotates (ring's `Ticketer`), server cipher-suite order. The certificate is served through
//! [`ReloadableCert`], so it can be swapped atomically while connections continue; each TLS
//! listener's whole configuration (with its client CA and CRLs) sits in a [`ListenerTls`] and is
//! swapped the same way. [`TlsMaterial::reload`] re-reads every file and swaps only if all of them
//! load: a broken file changes nothing.
//!
//! TLS knows nothing of policy: it reports the negotiated version, nothing more.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::ring as provider;
use rustls::server::ProducesTickets;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ProtocolVersion, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{ClientAuth, TlsFiles};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Loads a certificate chain and its private key from PEM files into a signing key.
pub(crate) fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let pem_err = |path: &Path, message: String| TlsError::Pem {
        path: path.display().to_string(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(cert, "no certificate found".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e.to_string()))?;
    let provider = provider::default_provider();
    let certified = CertifiedKey::from_der(chain, key_der, &provider)?;
    Ok(certified)
}

/// Serves one certificate that can be replaced while the server runs.
#[derive(Debug)]
pub(crate) struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    /// Starts with `key`.
    pub(crate) fn new(key: CertifiedKey) -> Self {
        Self {
            current: RwLock::new(Arc::new(key)),
        }
    }

    /// Replaces the served certificate; handshakes after this call use the new one, existing
    /// connections keep theirs.
    pub(crate) fn replace(&self, key: CertifiedKey) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(key);
    }

    /// The certificate served now.
    pub(crate) fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A verifier of client certificates chaining to the CAs in `ca` (PEM), checked against the CRLs
/// in `crls` (PEM). `Optional` lets clients without a certificate through; a certificate that is
/// presented must verify in both modes.
///
/// With CRLs configured, revocation fails closed: every certificate in a client's chain (below
/// the trust anchor) needs a CRL from its issuer, and a CRL past its `nextUpdate` refuses every
/// certificate it covers until a fresh one is loaded (SIGHUP). A CRL file holding no CRL is an
/// error, not "nothing revoked".
pub(crate) fn client_verifier(
    ca: &Path,
    crls: &[std::path::PathBuf],
    mode: ClientAuth,
) -> Result<Option<Arc<dyn ClientCertVerifier>>, TlsError> {
    if mode == ClientAuth::None {
        return Ok(None);
    }
    let pem_err = |path: &Path, message: String| TlsError::Pem {
        path: path.display().to_string(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| pem_err(ca, e.to_string()))? {
        roots.add(cert.map_err(|e| pem_err(ca, e.to_string()))?)?;
    }
    let mut revoked = Vec::new();
    for file in crls {
        let before = revoked.len();
        for crl in CertificateRevocationListDer::pem_file_iter(file)
            .map_err(|e| pem_err(file, e.to_string()))?
        {
            revoked.push(crl.map_err(|e| pem_err(file, e.to_string()))?);
        }
        if revoked.len() == before {
            return Err(pem_err(file, "no X509 CRL found".into()));
        }
    }
    let builder = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(provider::default_provider()),
    )
    .with_crls(revoked)
    .enforce_revocation_expiration();
    let verifier = match mode {
        ClientAuth::Optional => builder.allow_unauthenticated().build()?,
        _ => builder.build()?,
    };
    Ok(Some(verifier))
}

/// The server configuration: ring provider, TLS 1.3 + 1.2, ALPN h2 and http/1.1, the server's
/// cipher-suite order (AEAD only; rustls has no other kind), session tickets from `ticketer`, and
/// client certificates if `clients` is given.
pub(crate) fn server_config(
    cert: Arc<ReloadableCert>,
    clients: Option<Arc<dyn ClientCertVerifier>>,
    ticketer: Arc<dyn ProducesTickets>,
) -> Result<ServerConfig, TlsError> {
    let builder = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match clients {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    config.ticketer = ticketer;
    Ok(config)
}

/// One TLS listener's configuration, replaceable while the listener runs: each handshake uses the
/// configuration current when it starts.
///
/// A replacement starts a new ticket key and session cache on purpose: a resumed session skips
/// certificate verification, so keeping them would let a client whose certificate the reload
/// revoked or stopped trusting carry on by resuming a session made before it.
pub(crate) struct ListenerTls {
    client_auth: ClientAuth,
    current: RwLock<Arc<ServerConfig>>,
}

impl ListenerTls {
    /// This listener's configuration built from `files` (client CA and CRLs read afresh).
    fn build(
        served: &Arc<ReloadableCert>,
        files: &TlsFiles,
        client_auth: ClientAuth,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let clients = match &files.client_ca {
            Some(ca) => client_verifier(ca, &files.client_crls, client_auth)?,
            None => None,
        };
        Ok(Arc::new(server_config(
            served.clone(),
            clients,
            provider::Ticketer::new()?,
        )?))
    }

    /// An acceptor for the next handshake.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The daemon's TLS files and everything built from them: the served certificate and every TLS
/// listener's configuration.
pub(crate) struct TlsMaterial {
    files: TlsFiles,
    served: Arc<ReloadableCert>,
    listeners: Vec<Arc<ListenerTls>>,
}

impl TlsMaterial {
    /// Loads the certificate and key (checking that they match).
    pub(crate) fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let key = load_certified_key(&files.cert, &files.key)?;
        key.keys_match()?;
        Ok(Self {
            files,
            served: Arc::new(ReloadableCert::new(key)),
            listeners: Vec::new(),
        })
    }

    /// Builds the configuration of one more TLS listener, asking for client certificates as
    /// `client_auth` says.
    pub(crate) fn listener(
        &mut self,
        client_auth: ClientAuth,
    ) -> Result<Arc<ListenerTls>, TlsError> {
        let config = ListenerTls::build(&self.served, &self.files, client_auth)?;
        let listener = Arc::new(ListenerTls {
            client_auth,
            current: RwLock::new(config),
        });
        self.listeners.push(listener.clone());
        Ok(listener)
    }

    /// Re-reads the certificate, key, client CA and CRLs. Only if every file loads are they all
    /// swapped in; on any error nothing changes. Connections already open keep their session;
    /// sessions made before the reload no longer resume (see [`ListenerTls`]).
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let key = load_certified_key(&self.files.cert, &self.files.key)?;
        key.keys_match()?;
        let configs = self
            .listeners
            .iter()
            .map(|l| ListenerTls::build(&self.served, &self.files, l.client_auth))
            .collect::<Result<Vec<_>, _>>()?;
        self.served.replace(key);
        for (listener, config) in self.listeners.iter().zip(configs) {
            *listener
                .current
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        }
        Ok(())
    }

    /// The certificate file, for messages.
    pub(crate) fn cert_file(&self) -> &PathBuf {
        &self.files.cert
    }
}

/// The name of a negotiated protocol version, as written in audit events.
pub(crate) fn version_name(version: Option<ProtocolVersion>) -> Option<&'static str> {
    match version? {
        ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
        ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
        _ => Some("other"),
    }
}
