//! The store's decisions, once: what a refused compare-and-set means, whether a listed record is
//! still the one to rewrap, whether a seal is under the key reserved for it, and what a record's
//! chunks open to. The backends run the SQL and call these; none decides on its own.

use super::{
    InstanceRecord, PASSWORD_FIELD, PasswordRecord, RewrapCandidate, SetOutcome, StoreError,
};
use crate::crypto::{KeyId, Keyring, RecordBinding, sealed_key_id};
use crate::ids::InstanceId;
use zeroize::Zeroizing;

/// Why a set-once compare-and-set changed no row: no such instance, another project's, or a
/// password already set (read in the same transaction, after the refused update).
pub fn set_once_refused(row: Option<&InstanceRecord>, project: &str) -> SetOutcome {
    match row {
        None => SetOutcome::NotFound,
        Some(r) if r.project_id.as_str() != project => SetOutcome::ProjectMismatch,
        Some(_) => SetOutcome::AlreadySet,
    }
}

/// Whether a post may set the password of `row`, read under its lock: `Ok` if the instance is
/// `project`'s and has none, else the refusal (for backends that decide before they write, like
/// PostgreSQL's batches; the others' conditional update decides the same).
pub fn set_once_allowed(row: Option<&InstanceRecord>, project: &str) -> Result<(), SetOutcome> {
    match row {
        Some(r) if r.project_id.as_str() == project && !r.password_set => Ok(()),
        other => Err(set_once_refused(other, project)),
    }
}

/// A record's password state as a row holds it, for [`still_listed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedState {
    /// Whether a password is set.
    pub set: bool,
    /// The record version.
    pub version: Option<u64>,
    /// The key it is sealed under.
    pub key_id: Option<KeyId>,
}

/// Whether the row (read under its lock) is still the record a rewrap listed: set, same version,
/// same key. Anything else (changed, cleared, deleted) is left as it is.
pub fn still_listed(current: Option<SealedState>, listed: &RewrapCandidate) -> bool {
    current.is_some_and(|state| {
        state.set && state.version == Some(listed.version) && state.key_id == Some(listed.key_id)
    })
}

/// A seal must name the key whose budget was reserved for it: anything else is a bug that must
/// not reach the store.
pub fn check_sealed_under(sealed: &[u8], reserved: KeyId) -> Result<(), StoreError> {
    if sealed_key_id(sealed) == Some(reserved) {
        Ok(())
    } else {
        Err(StoreError::Corrupt(
            "a seal named another key than the one reserved".into(),
        ))
    }
}

/// The refusal when a key's seal budget could not be taken: spent, or a key the store never
/// registered.
pub fn seal_refused(key_id: KeyId, known: bool) -> StoreError {
    if known {
        StoreError::KeyExhausted(key_id)
    } else {
        StoreError::UnknownKey(key_id)
    }
}

/// Why a stored password cannot be given out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the stored password failed its integrity check")]
pub struct IntegrityFailure;

impl PasswordRecord {
    /// The password this record holds, opened and checked: `None` when none is set, an
    /// [`IntegrityFailure`] for chunks without the flag (written behind metapass's back), chunks
    /// that do not join, or a seal that does not open for this record's project, instance and
    /// version.
    pub fn open(
        &self,
        id: &InstanceId,
        keyring: &Keyring,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, IntegrityFailure> {
        if !self.instance.password_set {
            return if self.chunks.is_empty() {
                Ok(None)
            } else {
                Err(IntegrityFailure)
            };
        }
        let sealed =
            super::chunks::join(PASSWORD_FIELD, &self.chunks).map_err(|_| IntegrityFailure)?;
        let binding = RecordBinding {
            project_id: self.instance.project_id.as_str(),
            instance_id: id.as_str(),
            field: PASSWORD_FIELD,
            version: self.instance.password_version,
        };
        keyring
            .open(&binding, &sealed)
            .map(Some)
            .map_err(|_| IntegrityFailure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ProjectId;

    const ID: &str = "8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90";

    fn row(project: &str, set: bool) -> InstanceRecord {
        InstanceRecord {
            project_id: ProjectId::parse(project).unwrap(),
            password_set: set,
            password_version: 3,
        }
    }

    fn keyring() -> Keyring {
        Keyring::new(&[(1, Zeroizing::new(vec![7u8; 32]))], 1).unwrap()
    }

    #[test]
    fn a_refused_set_once_names_why() {
        assert_eq!(set_once_refused(None, "p"), SetOutcome::NotFound);
        assert_eq!(
            set_once_refused(Some(&row("q", false)), "p"),
            SetOutcome::ProjectMismatch
        );
        assert_eq!(
            set_once_refused(Some(&row("p", true)), "p"),
            SetOutcome::AlreadySet
        );
    }

    #[test]
    fn a_set_is_allowed_only_on_the_projects_unset_instance() {
        assert_eq!(set_once_allowed(Some(&row("p", false)), "p"), Ok(()));
        assert_eq!(set_once_allowed(None, "p"), Err(SetOutcome::NotFound));
        assert_eq!(
            set_once_allowed(Some(&row("q", false)), "p"),
            Err(SetOutcome::ProjectMismatch)
        );
        assert_eq!(
            set_once_allowed(Some(&row("p", true)), "p"),
            Err(SetOutcome::AlreadySet)
        );
    }

    #[test]
    fn only_the_listed_record_is_rewrapped() {
        let listed = RewrapCandidate {
            id: InstanceId::parse(ID).unwrap(),
            project: ProjectId::parse("p").unwrap(),
            version: 5,
            key_id: 1,
        };
        let same = SealedState {
            set: true,
            version: Some(5),
            key_id: Some(1),
        };
        assert!(still_listed(Some(same), &listed));
        assert!(!still_listed(None, &listed));
        for changed in [
            SealedState { set: false, ..same },
            SealedState {
                version: Some(6),
                ..same
            },
            SealedState {
                key_id: Some(2),
                ..same
            },
        ] {
            assert!(!still_listed(Some(changed), &listed), "{changed:?}");
        }
    }

    #[test]
    fn seals_and_budgets() {
        let id = InstanceId::parse(ID).unwrap();
        let binding = RecordBinding {
            project_id: "p",
            instance_id: id.as_str(),
            field: PASSWORD_FIELD,
            version: 3,
        };
        let sealed = keyring().seal(&binding, b"blob").unwrap();
        assert!(check_sealed_under(&sealed, 1).is_ok());
        assert!(matches!(
            check_sealed_under(&sealed, 2),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(seal_refused(4, true), StoreError::KeyExhausted(4)));
        assert!(matches!(seal_refused(4, false), StoreError::UnknownKey(4)));
    }

    #[test]
    fn a_record_opens_only_as_what_was_sealed() {
        let id = InstanceId::parse(ID).unwrap();
        let keyring = keyring();
        let binding = RecordBinding {
            project_id: "p",
            instance_id: id.as_str(),
            field: PASSWORD_FIELD,
            version: 3,
        };
        let sealed = keyring.seal(&binding, b"blob").unwrap();
        let record = |set: bool, project: &str, chunks: Vec<(String, Vec<u8>)>| PasswordRecord {
            instance: row(project, set),
            chunks,
        };
        let stored: Vec<(String, Vec<u8>)> = super::super::chunks::split(PASSWORD_FIELD, &sealed)
            .into_iter()
            .map(|(key, value)| (key, value.to_vec()))
            .collect();
        let opened = record(true, "p", stored.clone())
            .open(&id, &keyring)
            .unwrap();
        assert_eq!(opened.as_deref().map(Vec::as_slice), Some(&b"blob"[..]));
        assert_eq!(record(false, "p", vec![]).open(&id, &keyring), Ok(None));
        // Chunks without the flag, or a record moved to another project, do not open.
        assert_eq!(
            record(false, "p", stored.clone()).open(&id, &keyring),
            Err(IntegrityFailure)
        );
        assert_eq!(
            record(true, "q", stored).open(&id, &keyring),
            Err(IntegrityFailure)
        );
    }
}
