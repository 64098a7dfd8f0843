//! Nova's compute API microversions: which one a request asks for, as Nova reads the headers.
//!
//! `OpenStack-API-Version: compute X` is read first (several services may share the header,
//! comma-separated); the legacy `X-OpenStack-Nova-API-Version: X` only when it names no compute
//! version, as `microversion_parse` does for Nova. `X` is `major.minor` (Nova's pattern
//! `^([1-9]\d*)\.([1-9]\d*|0)$`) or `latest`. No header means the minimum, 2.1.

use std::fmt;

use http::HeaderMap;

/// A compute API microversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Microversion {
    /// The major version (2).
    pub major: u16,
    /// The minor version.
    pub minor: u16,
}

/// The oldest microversion: what a request without a version header gets.
pub(crate) const MIN: Microversion = Microversion { major: 2, minor: 1 };

/// Nova's current maximum (nova/api/openstack/api_version_request.py), the default of
/// `[compute_api] max_microversion`. The password API is the same in all of them.
pub(crate) const NOVA_MAX: Microversion = Microversion {
    major: 2,
    minor: 104,
};

impl Microversion {
    /// Parses `major.minor` exactly as Nova does: no leading zeros, no sign, no spaces.
    pub fn parse(text: &str) -> Option<Self> {
        let (major, minor) = text.split_once('.')?;
        let number = |s: &str, zero_ok: bool| -> Option<u16> {
            let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
            let canonical = !s.starts_with('0') || (zero_ok && s == "0");
            if digits && canonical {
                s.parse().ok()
            } else {
                None
            }
        };
        Some(Self {
            major: number(major, false)?,
            minor: number(minor, true)?,
        })
    }
}

impl fmt::Display for Microversion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What a request asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Requested {
    /// No compute version header: the minimum.
    Default,
    /// `latest`: the maximum.
    Latest,
    /// A well-formed version.
    Version(Microversion),
}

/// Why the version headers are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// Not `major.minor` or `latest` (Nova: 400).
    #[error("API Version String {0} is of invalid format. Must be of format MajorNum.MinorNum.")]
    Malformed(String),
    /// Well-formed, outside what is served (Nova: 406).
    #[error(
        "Version {version} is not supported by the API. Minimum is {MIN} and maximum is {max}."
    )]
    Unsupported {
        /// What was asked for.
        version: Microversion,
        /// The configured maximum.
        max: Microversion,
    },
}

/// The compute version named in `OpenStack-API-Version` values, if any: `Err` for a value that
/// is not a list of `service version` pairs.
fn from_openstack_header(headers: &HeaderMap) -> Result<Option<String>, VersionError> {
    let mut found = None;
    for value in headers.get_all("openstack-api-version") {
        let text = value
            .to_str()
            .map_err(|_| VersionError::Malformed("(not text)".into()))?;
        for part in text.split(',') {
            let mut words = part.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(service), Some(version), None) => {
                    if service.eq_ignore_ascii_case("compute") {
                        found = Some(version.to_owned());
                    }
                }
                (None, _, _) => {}
                _ => {
                    return Err(VersionError::Malformed(crate::audit::event::bounded(
                        part.trim(),
                    )));
                }
            }
        }
    }
    Ok(found)
}

/// The version the headers ask for (see the module docs).
pub(crate) fn requested(headers: &HeaderMap) -> Result<Requested, VersionError> {
    let text = match from_openstack_header(headers)? {
        Some(v) => Some(v),
        None => match headers.get("x-openstack-nova-api-version") {
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| VersionError::Malformed("(not text)".into()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        },
    };
    match text {
        None => Ok(Requested::Default),
        Some(t) if t.eq_ignore_ascii_case("latest") => Ok(Requested::Latest),
        Some(t) => Microversion::parse(&t)
            .map(Requested::Version)
            .ok_or_else(|| VersionError::Malformed(crate::audit::event::bounded(&t))),
    }
}

/// The version a request is served at: what it asked for, between [`MIN`] and `max`.
pub(crate) fn negotiate(
    headers: &HeaderMap,
    max: Microversion,
) -> Result<Microversion, VersionError> {
    match requested(headers)? {
        Requested::Default => Ok(MIN),
        Requested::Latest => Ok(max),
        Requested::Version(v) if (MIN..=max).contains(&v) => Ok(v),
        Requested::Version(version) => Err(VersionError::Unsupported { version, max }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn versions_parse_as_novas_pattern() {
        assert_eq!(Microversion::parse("2.1"), Some(MIN));
        assert_eq!(Microversion::parse("2.0").map(|v| v.minor), Some(0));
        assert_eq!(Microversion::parse("2.104"), Some(NOVA_MAX));
        for bad in [
            "2",
            "2.",
            ".1",
            "02.1",
            "2.01",
            "2.1.1",
            "-2.1",
            "2.x",
            " 2.1",
            "v2.1",
            "99999999.1",
        ] {
            assert_eq!(Microversion::parse(bad), None, "{bad}");
        }
        assert_eq!(NOVA_MAX.to_string(), "2.104");
    }

    #[test]
    fn headers_negotiate_as_nova_does() {
        let max = Microversion::parse("2.96").unwrap();
        let v = |pairs: &[(&'static str, &str)]| negotiate(&headers(pairs), max);
        assert_eq!(v(&[]), Ok(MIN));
        assert_eq!(v(&[("openstack-api-version", "compute latest")]), Ok(max));
        assert_eq!(v(&[("x-openstack-nova-api-version", "2.96")]), Ok(max));
        assert_eq!(
            v(&[("openstack-api-version", "identity 3.0, compute 2.50")]).map(|m| m.minor),
            Ok(50)
        );
        // The new header wins over the legacy one; the legacy one counts when the new one names
        // another service only.
        assert_eq!(
            v(&[
                ("openstack-api-version", "compute 2.3"),
                ("x-openstack-nova-api-version", "2.9")
            ])
            .map(|m| m.minor),
            Ok(3)
        );
        assert_eq!(
            v(&[
                ("openstack-api-version", "volume 3.0"),
                ("x-openstack-nova-api-version", "2.9")
            ])
            .map(|m| m.minor),
            Ok(9)
        );
        assert!(matches!(
            v(&[("openstack-api-version", "compute 2.97")]),
            Err(VersionError::Unsupported { .. })
        ));
        assert!(matches!(
            v(&[("openstack-api-version", "compute 2.0")]),
            Err(VersionError::Unsupported { .. })
        ));
        assert!(matches!(
            v(&[("openstack-api-version", "compute 3.0")]),
            Err(VersionError::Unsupported { .. })
        ));
        for bad in [
            "compute",
            "compute 2.x",
            "compute 2.1 extra",
            "compute 02.1",
        ] {
            assert!(
                matches!(
                    v(&[("openstack-api-version", bad)]),
                    Err(VersionError::Malformed(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            v(&[("x-openstack-nova-api-version", "two")]),
            Err(VersionError::Malformed(_))
        ));
    }
}
