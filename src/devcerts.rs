//! The development certificate authority: `metapass dev-certs --out certs-dev/`.
//!
//! FOR DEVELOPMENT AND TESTS ONLY. The private keys it writes are committed to the repository and
//! therefore public. It produces:
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key` | the dev CA |
//! | `server.pem`, `server.key` | the server: SAN `IP:127.0.0.1`, `IP:::1`, `DNS:localhost` |
//! | `instance-1.pem/.key`, `instance-2.pem/.key` | client certificates with SAN URI `urn:uuid:<id>` |
//! | `proxy.pem`, `proxy.key` | the metadata proxy's client certificate (SAN `DNS:metadata-proxy.dev.invalid`) |
//! | `expired.pem`, `expired.key` | a client certificate that expired in 2020 |
//! | `revoked.pem`, `revoked.key` | a client certificate (instance 1) listed in `ca.crl` |
//! | `ca.crl` | the dev CA's certificate revocation list |
//! | `foreign-ca.pem`, `foreign.pem`, `foreign.key` | a client certificate from another CA |
//!
//! The CA lives ten years; leaf certificates [`DEFAULT_LEAF_DAYS`] unless told otherwise.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    CrlDistributionPoint, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod,
    KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime, macros::datetime};

/// The instance id in `instance-1.pem`.
pub(crate) const DEV_INSTANCE_1: &str = "8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90";
/// The instance id in `instance-2.pem`.
pub(crate) const DEV_INSTANCE_2: &str = "5f0c7d2a-3e41-4b9a-8c6d-1a2b3c4d5e6f";
/// The DNS SAN of the proxy certificate.
pub(crate) const DEV_PROXY_NAME: &str = "metadata-proxy.dev.invalid";
/// How long leaf certificates live by default: the committed set keeps working for years.
pub(crate) const DEFAULT_LEAF_DAYS: u32 = 3650;
/// Where the dev CA would publish its CRL (a `.invalid` name: nothing is ever fetched from it).
pub(crate) const DEV_CRL_URI: &str = "http://crl.dev.invalid/metapass-dev-ca.crl";
/// The serial number of `revoked.pem`.
const REVOKED_SERIAL: &[u8] = b"revoked!";

/// Why the dev certificates could not be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DevCertError {
    /// rcgen refused.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn params(
    common_name: &str,
    sans: Vec<SanType>,
    validity: (OffsetDateTime, OffsetDateTime),
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::OrganizationName,
        "metapass development (NOT FOR PRODUCTION)",
    );
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    (p.not_before, p.not_after) = validity;
    p
}

fn ca_params(name: &str, validity: (OffsetDateTime, OffsetDateTime)) -> CertificateParams {
    let mut p = params(name, Vec::new(), validity);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn leaf(mut p: CertificateParams, usage: ExtendedKeyUsagePurpose) -> CertificateParams {
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    p
}

fn uri(s: &str) -> Result<SanType, rcgen::Error> {
    Ok(SanType::URI(s.try_into()?))
}

fn dns(s: &str) -> Result<SanType, rcgen::Error> {
    Ok(SanType::DnsName(s.try_into()?))
}

/// The output directory and the files written to it so far.
struct Out {
    dir: PathBuf,
    written: Vec<PathBuf>,
}

impl Out {
    /// Writes one file, owner-only (0600) like all TLS material `serve` accepts outside dev mode.
    fn emit(&mut self, name: &str, contents: &str) -> std::io::Result<()> {
        let path = self.dir.join(name);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        // `mode` applies only to a new file; an overwritten one is tightened too.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(contents.as_bytes())?;
        self.written.push(path);
        Ok(())
    }

    /// Issues a leaf certificate from `issuer` and writes `<name>.pem` and `<name>.key`.
    fn issue(
        &mut self,
        name: &str,
        params: CertificateParams,
        issuer: &CertifiedIssuer<'_, KeyPair>,
    ) -> Result<(), DevCertError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, issuer)?;
        self.emit(&format!("{name}.pem"), &cert.pem())?;
        self.emit(&format!("{name}.key"), &key.serialize_pem())?;
        Ok(())
    }
}

/// Writes a fresh set of dev certificates into `out`, leaf certificates valid for `leaf_days`, and
/// returns the files written.
///
/// Long on purpose: a linear recipe (the CA, then each leaf), one certificate after another.
pub(crate) fn generate(out: &Path, leaf_days: u32) -> Result<Vec<PathBuf>, DevCertError> {
    fs::create_dir_all(out)?;
    let mut out = Out {
        dir: out.to_owned(),
        written: Vec::new(),
    };
    let now = crate::clock::wall_now();
    let long = (now - Duration::days(1), now + Duration::days(3650));
    let leaf_validity = (
        now - Duration::days(1),
        now + Duration::days(i64::from(leaf_days) - 1),
    );

    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params("metapass dev CA", long), ca_key)?;
    out.emit("ca.pem", &ca.pem())?;
    out.emit("ca.key", &ca_key_pem)?;

    let server_sans = vec![
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        dns("localhost")?,
    ];
    let mut server = leaf(
        params("localhost", server_sans, leaf_validity),
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    server.crl_distribution_points = vec![CrlDistributionPoint {
        uris: vec![DEV_CRL_URI.to_owned()],
    }];
    out.issue("server", server, &ca)?;
    for (name, id) in [
        ("instance-1", DEV_INSTANCE_1),
        ("instance-2", DEV_INSTANCE_2),
    ] {
        let sans = vec![uri(&format!("urn:uuid:{id}"))?];
        out.issue(
            name,
            leaf(
                params(id, sans, leaf_validity),
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
            &ca,
        )?;
    }
    let proxy = leaf(
        params(DEV_PROXY_NAME, vec![dns(DEV_PROXY_NAME)?], leaf_validity),
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    out.issue("proxy", proxy, &ca)?;
    let expired_validity = (
        datetime!(2019-01-01 0:00 UTC),
        datetime!(2020-01-01 0:00 UTC),
    );
    let expired_sans = vec![uri(&format!("urn:uuid:{DEV_INSTANCE_1}"))?];
    out.issue(
        "expired",
        leaf(
            params("expired", expired_sans, expired_validity),
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
        &ca,
    )?;

    let mut revoked = leaf(
        params(
            "revoked",
            vec![uri(&format!("urn:uuid:{DEV_INSTANCE_1}"))?],
            leaf_validity,
        ),
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    revoked.serial_number = Some(SerialNumber::from_slice(REVOKED_SERIAL));
    out.issue("revoked", revoked, &ca)?;
    let crl = CertificateRevocationListParams {
        this_update: now - Duration::days(1),
        next_update: now + Duration::days(3650),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from_slice(REVOKED_SERIAL),
            revocation_time: now - Duration::days(1),
            reason_code: Some(RevocationReason::KeyCompromise),
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca)?;
    out.emit("ca.crl", &crl.pem()?)?;

    let foreign_ca =
        CertifiedIssuer::self_signed(ca_params("foreign CA", long), KeyPair::generate()?)?;
    out.emit("foreign-ca.pem", &foreign_ca.pem())?;
    let foreign_sans = vec![uri(&format!("urn:uuid:{DEV_INSTANCE_1}"))?];
    out.issue(
        "foreign",
        leaf(
            params("foreign", foreign_sans, leaf_validity),
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
        &foreign_ca,
    )?;
    Ok(out.written)
}
