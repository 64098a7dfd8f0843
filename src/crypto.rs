//! Authenticated encryption at rest: a keyring of AES-256-GCM data keys and the sealed-record format.
//!
//! A sealed record is
//!
//! ```text
//! [format = 0x02][key id: u32 BE][nonce: 12 bytes][ciphertext of the padded plaintext][tag: 16 bytes]
//! ```
//!
//! The plaintext is padded to [`PADDED_LEN`] bytes (`[length: u16 BE][text][zeros]`) before sealing,
//! so every sealed record has the same length ([`SEALED_LEN`]) whatever the password's length.
//! The additional authenticated data binds the record to where it belongs: the owning project, the
//! instance id, the field name, the record version and the key id. A record copied to another
//! instance or field, restored from an older version, relabelled with another key id, or whose
//! instance row was edited to name another project fails to open.
//!
//! Format 1 (written before the project was bound) is still opened, with its own AAD, which does
//! not name the project; such records become format 2 when they are next sealed (a new post or a
//! rewrap after a key rotation).
//!
//! Nonces are 96 random bits from `ring::rand::SystemRandom`; the store counts the seals made under
//! each key and refuses more than [`MAX_SEALS_PER_KEY`] (far below the 2^32 random-nonce bound of
//! NIST SP 800-38D), so a key is rotated long before a nonce collision becomes plausible.
//!
//! No part of the cipher is written here: ring does the AEAD through [`aead_seal_in_place`] and
//! [`aead_open_in_place`], which the known-answer tests (Wycheproof vectors) drive directly; this
//! module only frames records around them.

use std::collections::BTreeMap;
use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, Tag, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// The sealed-record format of metapass before the owning project was bound (opened, never written).
pub const FORMAT_V1: u8 = 0x01;
/// The sealed-record format written by this version: the owning project is in the AAD.
pub const FORMAT_V2: u8 = 0x02;
/// The length of a data key in bytes (AES-256).
pub const KEY_LEN: usize = 32;
/// The length of the authentication tag.
pub const TAG_LEN: usize = 16;
/// The longest plaintext that can be sealed (Nova's limit: four chunks of 255 characters).
pub const MAX_PLAINTEXT_LEN: usize = 1020;
/// The padded plaintext length: every record seals exactly this many bytes.
pub const PADDED_LEN: usize = 1024;
/// The length of the record header (format byte, key id, nonce).
pub const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;
/// The length of every sealed record.
pub const SEALED_LEN: usize = HEADER_LEN + PADDED_LEN + TAG_LEN;

/// Domain separation for the additional authenticated data of format 1.
const AAD_CONTEXT_V1: &[u8] = b"metapass.sealed-record.v1";
/// Domain separation for the additional authenticated data of format 2.
const AAD_CONTEXT_V2: &[u8] = b"metapass.sealed-record.v2";

/// The most records one data key may seal. Random 96-bit nonces stay safe (collision probability
/// below 2^-32) up to 2^32 seals per key (NIST SP 800-38D, 8.3); metapass stops at 2^30 and the
/// operator rotates.
pub const MAX_SEALS_PER_KEY: u64 = 1 << 30;

/// The message a key check value authenticates (see [`Keyring::check_values`]).
const KEY_CHECK_CONTEXT: &[u8] = b"metapass.data-key-check.v1";

/// A key check value: HMAC-SHA256 of a fixed message under the data key. It identifies a key's
/// secret without revealing it, so replicas and restarts can prove they hold the same secret
/// under the same id.
pub type KeyCheck = [u8; 32];

/// The identifier of a data key in the keyring and in sealed records.
pub type KeyId = u32;

/// Where a sealed record belongs. All of it is authenticated, none of it is encrypted.
#[derive(Debug, Clone, Copy)]
pub struct RecordBinding<'a> {
    /// The project that owns the instance: a row edited to name another project does not open.
    pub project_id: &'a str,
    /// The instance the record belongs to.
    pub instance_id: &'a str,
    /// The field within the instance's metadata (`password`).
    pub field: &'a str,
    /// The record version: monotonic per instance, bumped on every set and clear.
    pub version: u64,
}

/// Why the keyring could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// No keys were given.
    #[error("the keyring holds no data keys")]
    Empty,
    /// Two keys share an id.
    #[error("data key id {0} appears more than once")]
    DuplicateId(KeyId),
    /// The active key id names no key.
    #[error("the active key id {0} is not in the keyring")]
    ActiveMissing(KeyId),
    /// A key of the wrong length.
    #[error("data key {0} is not {KEY_LEN} bytes")]
    BadKey(KeyId),
}

/// Why a plaintext could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// Longer than [`MAX_PLAINTEXT_LEN`].
    #[error("plaintext longer than {MAX_PLAINTEXT_LEN} bytes")]
    TooLong,
    /// The binding fields are too long to frame.
    #[error("record binding field longer than 255 bytes")]
    BindingTooLong,
    /// The system random generator or the cipher failed.
    #[error("sealing failed")]
    Cipher,
}

/// Why a sealed record could not be opened. Every variant means the record is not what was sealed
/// for this binding; callers report all of them as an integrity failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Wrong length, unknown format byte, or bad padding.
    #[error("sealed record is malformed")]
    Malformed,
    /// The record names a key the keyring does not hold.
    #[error("sealed record names unknown data key {0}")]
    UnknownKey(KeyId),
    /// Authentication failed: tampered, truncated, or bound to another instance/field/version.
    #[error("sealed record failed authentication")]
    Authentication,
}

/// Versioned AES-256-GCM data keys: one active key seals, every key opens.
pub struct Keyring {
    active: KeyId,
    keys: BTreeMap<KeyId, LessSafeKey>,
    checks: BTreeMap<KeyId, KeyCheck>,
    rng: SystemRandom,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Builds a keyring from raw keys. The raw bytes stay in [`Zeroizing`] buffers owned by the
    /// caller and are wiped when those drop; ring keeps its own expanded key schedule.
    pub fn new(keys: &[(KeyId, Zeroizing<Vec<u8>>)], active: KeyId) -> Result<Self, KeyringError> {
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        let mut map = BTreeMap::new();
        let mut checks = BTreeMap::new();
        for (id, raw) in keys {
            if raw.len() != KEY_LEN {
                return Err(KeyringError::BadKey(*id));
            }
            let unbound =
                UnboundKey::new(&AES_256_GCM, raw).map_err(|_| KeyringError::BadKey(*id))?;
            if map.insert(*id, LessSafeKey::new(unbound)).is_some() {
                return Err(KeyringError::DuplicateId(*id));
            }
            let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, raw), KEY_CHECK_CONTEXT);
            let mut check = [0u8; 32];
            check.copy_from_slice(tag.as_ref());
            checks.insert(*id, check);
        }
        if !map.contains_key(&active) {
            return Err(KeyringError::ActiveMissing(active));
        }
        Ok(Self {
            active,
            keys: map,
            checks,
            rng: SystemRandom::new(),
        })
    }

    /// Every key's check value, by id.
    pub fn check_values(&self) -> Vec<(KeyId, KeyCheck)> {
        self.checks.iter().map(|(id, c)| (*id, *c)).collect()
    }

    /// Whether the keyring holds `id`.
    pub fn holds(&self, id: KeyId) -> bool {
        self.keys.contains_key(&id)
    }

    /// The id of the key that seals new records.
    pub fn active_key_id(&self) -> KeyId {
        self.active
    }

    /// The ids of every key held, for opening.
    pub fn key_ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.keys().copied()
    }

    /// Seals `plaintext` for `binding` under the active key.
    pub fn seal(
        &self,
        binding: &RecordBinding<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        self.seal_as(FORMAT_V2, binding, plaintext)
    }

    /// Seals in a given format: only format 2 in production; tests make format-1 records to
    /// show that records written before the project was bound still open.
    fn seal_as(
        &self,
        format: u8,
        binding: &RecordBinding<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(SealError::TooLong);
        }
        let key_id = self.active;
        let key = &self.keys[&key_id];
        let aad = additional_data(format, binding, key_id)?;

        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Cipher)?;

        let mut out = Vec::with_capacity(SEALED_LEN);
        out.push(format);
        out.extend_from_slice(&key_id.to_be_bytes());
        out.extend_from_slice(&nonce);
        // The padded plaintext is written straight into the output and encrypted in place there, so
        // no separate plaintext copy outlives this function.
        let len = u16::try_from(plaintext.len()).map_err(|_| SealError::TooLong)?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(plaintext);
        out.resize(HEADER_LEN + PADDED_LEN, 0);
        let tag = aead_seal_in_place(key, nonce, &aad, &mut out[HEADER_LEN..])?;
        out.extend_from_slice(tag.as_ref());
        debug_assert_eq!(out.len(), SEALED_LEN);
        Ok(out)
    }

    /// Opens a sealed record for `binding`, returning the plaintext in a buffer wiped on drop.
    pub fn open(
        &self,
        binding: &RecordBinding<'_>,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        if sealed.len() != SEALED_LEN || !matches!(sealed[0], FORMAT_V1 | FORMAT_V2) {
            return Err(OpenError::Malformed);
        }
        let key_id = sealed_key_id(sealed).ok_or(OpenError::Malformed)?;
        let key = self
            .keys
            .get(&key_id)
            .ok_or(OpenError::UnknownKey(key_id))?;
        let aad = additional_data(sealed[0], binding, key_id).map_err(|_| OpenError::Malformed)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[5..HEADER_LEN]);

        let mut buf = Zeroizing::new(sealed[HEADER_LEN..].to_vec());
        let padded = aead_open_in_place(key, nonce, &aad, &mut buf)?;
        let len = usize::from(u16::from_be_bytes([padded[0], padded[1]]));
        if len > MAX_PLAINTEXT_LEN || padded[2 + len..].iter().any(|&b| b != 0) {
            return Err(OpenError::Malformed);
        }
        Ok(Zeroizing::new(padded[2..2 + len].to_vec()))
    }
}

/// AES-256-GCM encryption of `in_out` in place under `key`, `nonce` and `aad`; returns the tag.
/// The one place metapass seals.
pub fn aead_seal_in_place(
    key: &LessSafeKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    in_out: &mut [u8],
) -> Result<Tag, SealError> {
    key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), in_out)
        .map_err(|_| SealError::Cipher)
}

/// AES-256-GCM decryption of `ciphertext || tag` in place; returns the plaintext part of the
/// buffer. The one place metapass opens.
pub fn aead_open_in_place<'a>(
    key: &LessSafeKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    ciphertext_and_tag: &'a mut [u8],
) -> Result<&'a mut [u8], OpenError> {
    key.open_in_place(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        ciphertext_and_tag,
    )
    .map_err(|_| OpenError::Authentication)
}

/// A new random data key (32 bytes from the system generator), wiped on drop.
pub fn generate_key() -> Result<Zeroizing<Vec<u8>>, SealError> {
    let mut key = Zeroizing::new(vec![0u8; KEY_LEN]);
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| SealError::Cipher)?;
    Ok(key)
}

/// The key id a sealed record names, if it is long enough to have one.
pub fn sealed_key_id(sealed: &[u8]) -> Option<KeyId> {
    let bytes: [u8; 4] = sealed.get(1..5)?.try_into().ok()?;
    Some(KeyId::from_be_bytes(bytes))
}

/// Format 2: `context || len(project) || project || len(instance) || instance || len(field) ||
/// field || version || key id`; format 1 lacks the project. Every variable-length part is prefixed
/// with its length so that no two bindings frame to the same bytes, and the context differs per
/// format so that no format-1 AAD equals a format-2 one.
fn additional_data(
    format: u8,
    binding: &RecordBinding<'_>,
    key_id: KeyId,
) -> Result<Vec<u8>, SealError> {
    let framed = |part: &str, aad: &mut Vec<u8>| -> Result<(), SealError> {
        let len = u8::try_from(part.len()).map_err(|_| SealError::BindingTooLong)?;
        aad.push(len);
        aad.extend_from_slice(part.as_bytes());
        Ok(())
    };
    let mut aad = Vec::with_capacity(
        AAD_CONTEXT_V2.len()
            + 3
            + binding.project_id.len()
            + binding.instance_id.len()
            + binding.field.len()
            + 12,
    );
    if format == FORMAT_V1 {
        aad.extend_from_slice(AAD_CONTEXT_V1);
    } else {
        aad.extend_from_slice(AAD_CONTEXT_V2);
        framed(binding.project_id, &mut aad)?;
    }
    framed(binding.instance_id, &mut aad)?;
    framed(binding.field, &mut aad)?;
    aad.extend_from_slice(&binding.version.to_be_bytes());
    aad.extend_from_slice(&key_id.to_be_bytes());
    Ok(aad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring(ids: &[KeyId], active: KeyId) -> Keyring {
        let keys: Vec<_> = ids
            .iter()
            .map(|&id| (id, Zeroizing::new(vec![id as u8; KEY_LEN])))
            .collect();
        Keyring::new(&keys, active).unwrap()
    }

    const A: RecordBinding<'static> = RecordBinding {
        project_id: "project-a",
        instance_id: "8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90",
        field: "password",
        version: 1,
    };

    #[test]
    fn seal_then_open_round_trips_and_hides_length() {
        let ring = keyring(&[1], 1);
        for text in [&b"x"[..], b"hunter2", &[b'a'; MAX_PLAINTEXT_LEN]] {
            let sealed = ring.seal(&A, text).unwrap();
            assert_eq!(sealed.len(), SEALED_LEN);
            assert_eq!(&*ring.open(&A, &sealed).unwrap(), text);
        }
        assert!(matches!(
            ring.seal(&A, &[0; MAX_PLAINTEXT_LEN + 1]),
            Err(SealError::TooLong)
        ));
    }

    #[test]
    fn nonces_differ_between_seals() {
        let ring = keyring(&[1], 1);
        let a = ring.seal(&A, b"same").unwrap();
        let b = ring.seal(&A, b"same").unwrap();
        assert_ne!(a[5..HEADER_LEN], b[5..HEADER_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn a_record_opens_only_where_it_was_sealed() {
        let ring = keyring(&[1], 1);
        let sealed = ring.seal(&A, b"secret").unwrap();
        let other_instance = RecordBinding {
            instance_id: "00000000-0000-4000-8000-000000000000",
            ..A
        };
        let other_field = RecordBinding {
            field: "passwore",
            ..A
        };
        let old_version = RecordBinding { version: 0, ..A };
        let other_project = RecordBinding {
            project_id: "project-b",
            ..A
        };
        for binding in [other_instance, other_field, old_version, other_project] {
            assert_eq!(ring.open(&binding, &sealed), Err(OpenError::Authentication));
        }
    }

    #[test]
    fn tampering_is_detected() {
        let ring = keyring(&[1, 2], 1);
        let sealed = ring.seal(&A, b"secret").unwrap();
        for i in [0, 1, 4, 5, HEADER_LEN, HEADER_LEN + 500, SEALED_LEN - 1] {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert!(ring.open(&A, &t).is_err(), "flip at {i}");
        }
        // Relabelled with another key id that the keyring holds: the AAD binds the key id.
        let mut relabelled = sealed.clone();
        relabelled[1..5].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(ring.open(&A, &relabelled), Err(OpenError::Authentication));
        let mut unknown = sealed.clone();
        unknown[1..5].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(ring.open(&A, &unknown), Err(OpenError::UnknownKey(9)));
        assert_eq!(
            ring.open(&A, &sealed[..SEALED_LEN - 1]),
            Err(OpenError::Malformed)
        );
        assert_eq!(ring.open(&A, &[]), Err(OpenError::Malformed));
    }

    #[test]
    fn format_1_records_still_open_but_new_ones_bind_the_project() {
        let ring = keyring(&[1], 1);
        let old = ring.seal_as(FORMAT_V1, &A, b"secret").unwrap();
        assert_eq!(old[0], FORMAT_V1);
        assert_eq!(&*ring.open(&A, &old).unwrap(), b"secret");
        // Format 1 never named the project (the reason for format 2).
        let moved = RecordBinding {
            project_id: "project-b",
            ..A
        };
        assert_eq!(&*ring.open(&moved, &old).unwrap(), b"secret");
        let new = ring.seal(&A, b"secret").unwrap();
        assert_eq!(new[0], FORMAT_V2);
        assert_eq!(ring.open(&moved, &new), Err(OpenError::Authentication));
        // A format-2 record relabelled as format 1 (to drop the project) does not open.
        let mut downgraded = new.clone();
        downgraded[0] = FORMAT_V1;
        assert_eq!(ring.open(&A, &downgraded), Err(OpenError::Authentication));
        let mut unknown_format = new;
        unknown_format[0] = 0x03;
        assert_eq!(ring.open(&A, &unknown_format), Err(OpenError::Malformed));
    }

    #[test]
    fn every_key_opens_but_only_the_active_one_seals() {
        let old = keyring(&[1], 1);
        let sealed_old = old.seal(&A, b"secret").unwrap();
        let rotated = keyring(&[1, 2], 2);
        assert_eq!(&*rotated.open(&A, &sealed_old).unwrap(), b"secret");
        let sealed_new = rotated.seal(&A, b"secret").unwrap();
        assert_eq!(sealed_key_id(&sealed_new), Some(2));
        assert_eq!(old.open(&A, &sealed_new), Err(OpenError::UnknownKey(2)));
    }

    /// Published known-answer vectors (Wycheproof, AES-256-GCM, 96-bit IV) through the same seal
    /// and open functions the keyring uses; then every vector with one tag bit flipped must fail.
    #[test]
    fn wycheproof_known_answers_through_the_seal_and_open_path() {
        #[derive(serde::Deserialize)]
        struct Vector {
            #[serde(rename = "tcId")]
            id: u32,
            key: String,
            iv: String,
            aad: String,
            msg: String,
            ct: String,
            tag: String,
        }
        #[derive(serde::Deserialize)]
        struct Group {
            tests: Vec<Vector>,
        }
        #[derive(serde::Deserialize)]
        struct File {
            #[serde(rename = "testGroups")]
            groups: Vec<Group>,
        }
        let file: File = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/wycheproof/aes_gcm_256_iv96.json"
        )))
        .unwrap();
        let mut checked = 0;
        for v in file.groups.iter().flat_map(|g| &g.tests) {
            let h = |s: &str| hex::decode(s).unwrap();
            let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &h(&v.key)).unwrap());
            let nonce: [u8; NONCE_LEN] = h(&v.iv).try_into().unwrap();
            let (aad, msg) = (h(&v.aad), h(&v.msg));
            let mut buf = msg.clone();
            let tag = aead_seal_in_place(&key, nonce, &aad, &mut buf).unwrap();
            assert_eq!(hex::encode(&buf), v.ct, "tcId {} ciphertext", v.id);
            assert_eq!(hex::encode(tag.as_ref()), v.tag, "tcId {} tag", v.id);
            let mut sealed = [h(&v.ct), h(&v.tag)].concat();
            let opened = aead_open_in_place(&key, nonce, &aad, &mut sealed).unwrap();
            assert_eq!(opened, &msg[..], "tcId {} open", v.id);
            let mut forged = [h(&v.ct), h(&v.tag)].concat();
            *forged.last_mut().unwrap() ^= 0x80;
            assert_eq!(
                aead_open_in_place(&key, nonce, &aad, &mut forged).err(),
                Some(OpenError::Authentication),
                "tcId {} flipped tag",
                v.id
            );
            checked += 1;
        }
        assert_eq!(checked, 15);
    }

    #[test]
    fn check_values_identify_secrets_not_ids() {
        let a = keyring(&[1, 2], 1);
        let b = keyring(&[1, 2], 2);
        assert_eq!(
            a.check_values(),
            b.check_values(),
            "same secrets, same checks"
        );
        let other = Keyring::new(&[(1, Zeroizing::new(vec![7u8; KEY_LEN]))], 1).unwrap();
        assert_ne!(a.check_values()[0].1, other.check_values()[0].1);
        assert_ne!(a.check_values()[0].1, a.check_values()[1].1);
        assert!(a.holds(2) && !a.holds(3));
        let fresh = generate_key().unwrap();
        assert_eq!(fresh.len(), KEY_LEN);
        assert_ne!(*fresh, *generate_key().unwrap());
    }

    #[test]
    fn keyring_validation() {
        assert!(matches!(Keyring::new(&[], 1), Err(KeyringError::Empty)));
        let k = || Zeroizing::new(vec![0u8; KEY_LEN]);
        assert!(matches!(
            Keyring::new(&[(1, k()), (1, k())], 1),
            Err(KeyringError::DuplicateId(1))
        ));
        assert!(matches!(
            Keyring::new(&[(1, k())], 2),
            Err(KeyringError::ActiveMissing(2))
        ));
        assert!(matches!(
            Keyring::new(&[(1, Zeroizing::new(vec![0; 16]))], 1),
            Err(KeyringError::BadKey(1))
        ));
    }
}
