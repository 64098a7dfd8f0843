//! Validated identifiers.
//!
//! Identifiers cross every trust boundary (headers, paths, the store, the audit log), so they are
//! newtypes that can only be built by validation. Validation here is about shape, never about
//! existence: whether an instance is registered is the store's question.

use std::fmt;

use serde::Serialize;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// An instance id must be a canonical UUID: 36 characters, lowercase hex and hyphens.
    #[error("instance id must be a lowercase UUID like 8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90")]
    InstanceNotUuid,
    /// A project id must be 1 to 64 characters of `A-Z a-z 0-9 _ . -`.
    #[error("project id must be 1 to 64 characters of letters, digits, '_', '.' or '-'")]
    ProjectShape,
}

/// An instance (server) id: a canonical lowercase UUID, as Nova generates them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct InstanceId(String);

impl InstanceId {
    /// Accepts exactly the canonical form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in lowercase hex.
    ///
    /// Braced, URN, uppercase or hyphen-less spellings are refused so that one instance has exactly
    /// one spelling in the registry, in signatures and in the audit log.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let b = s.as_bytes();
        if b.len() != 36 {
            return Err(IdError::InstanceNotUuid);
        }
        for (i, &c) in b.iter().enumerate() {
            let ok = match i {
                8 | 13 | 18 | 23 => c == b'-',
                _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
            };
            if !ok {
                return Err(IdError::InstanceNotUuid);
            }
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Keystone project (tenant) id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ProjectId(String);

/// The longest project id accepted (Keystone's column is 64 characters).
pub const MAX_PROJECT_ID_LEN: usize = 64;

impl ProjectId {
    /// Accepts 1 to 64 characters of `A-Z a-z 0-9 _ . -`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_PROJECT_ID_LEN
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::ProjectShape)
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request id, `req-<uuid4>` as Nova writes them; sent as `X-Request-Id` and written into the
/// request's audit event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RequestId(String);

impl RequestId {
    /// A fresh random request id.
    pub fn new() -> Self {
        Self(format!("req-{}", uuid::Uuid::new_v4()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_have_one_spelling() {
        assert!(InstanceId::parse("8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90").is_ok());
        for bad in [
            "",
            "8A2E6D4C-0B1F-4C53-9A4E-2F1D3C5B7A90",
            "{8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90}",
            "8a2e6d4c0b1f4c539a4e2f1d3c5b7a90",
            "urn:uuid:8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90",
            "8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a9g",
            "8a2e6d4c-0b1f-4c53-9a4e+2f1d3c5b7a90",
            "../../../../../../../../../etc/passwd",
        ] {
            assert_eq!(
                InstanceId::parse(bad),
                Err(IdError::InstanceNotUuid),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn project_ids_are_keystone_shaped() {
        assert!(ProjectId::parse("project-a").is_ok());
        assert!(ProjectId::parse("0123456789abcdef0123456789abcdef").is_ok());
        assert!(ProjectId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "a/b", "ä", "a\0", &"a".repeat(65)] {
            assert!(ProjectId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_ids_look_like_novas() {
        let id = RequestId::new();
        assert!(id.as_str().starts_with("req-"));
        assert_eq!(id.as_str().len(), 40);
        assert_ne!(id, RequestId::new());
    }
}
