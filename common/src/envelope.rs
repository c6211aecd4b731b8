//! The v1 field envelope: how one field value is encrypted and bound to its place.
//!
//! ```text
//! byte 0        format version (0x01)
//! bytes 1..17   field key id (UUID, 16 bytes)
//! bytes 17..29  nonce (96 bits, random)
//! bytes 29..    ciphertext followed by the 16-byte GCM tag
//! AAD           bytes 0..17 of the envelope, then table, 0x00, column, 0x00, and the
//!               primary key in its canonical text form (UTF-8)
//! ```
//!
//! `FORMAT.md` at the repository root documents the same layout byte for byte with a
//! worked example that `tests::format_md_worked_example_matches` checks. This module does
//! no I/O.

use aes_gcm::Nonce;
use aes_gcm::aead::AeadInOut;
use aes_gcm::aead::Tag;
use rand::Rng;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::keys::ring::{FieldKey, KeyRing};
use crate::secret::Plaintext;

/// The only envelope format version this build writes and reads.
pub const VERSION: u8 = 0x01;
/// Version byte plus key id: the part of the envelope that is also authenticated as AAD.
pub const HEADER_LEN: usize = 17;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes an envelope adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;

/// Where a field value lives. It is authenticated with the value, so a ciphertext copied to
/// another table, column or row fails to decrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldLocation<'a> {
    /// The table as configured (e.g. `demo.users`), exactly as written at seal time.
    pub table: &'a str,
    pub column: &'a str,
    /// The row's primary key; its canonical text form is the decimal number.
    pub row_id: i64,
}

/// Why a value could not be sealed or opened. No variant carries key bytes or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "unknown field key {key_id}: it is not in the key ring (never loaded, retired or destroyed)"
    )]
    UnknownKey { key_id: Uuid },
    #[error("malformed envelope: {reason}")]
    Malformed { reason: &'static str },
    #[error(
        "authentication failed under field key {key_id}: the value was altered, moved to another row, column or table, or sealed with other key material"
    )]
    Tampered { key_id: Uuid },
    #[error("the key ring has no key to encrypt with")]
    NoEncryptKey,
    #[error(
        "field key {key_id} has reached its nonce budget of random-nonce encryptions: rotate to a new key"
    )]
    BudgetExhausted { key_id: Uuid },
}

impl From<crate::keys::ring::Error> for Error {
    fn from(e: crate::keys::ring::Error) -> Self {
        match e {
            crate::keys::ring::Error::UnknownKey { key_id } => Error::UnknownKey { key_id },
            crate::keys::ring::Error::BudgetExhausted { key_id } => {
                Error::BudgetExhausted { key_id }
            }
        }
    }
}

impl Error {
    /// A short stable label for metrics, audit details and the error table.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::UnknownKey { .. } => "unknown_key",
            Error::Malformed { .. } => "malformed",
            Error::Tampered { .. } => "tampered",
            Error::NoEncryptKey => "no_encrypt_key",
            Error::BudgetExhausted { .. } => "budget_exhausted",
        }
    }
}

/// Reads the field key id from an envelope's header without decrypting it.
pub fn key_id(envelope: &[u8]) -> Result<Uuid, Error> {
    check_shape(envelope)?;
    Ok(Uuid::from_bytes(
        envelope[1..HEADER_LEN].try_into().expect("16 bytes"),
    ))
}

fn check_shape(envelope: &[u8]) -> Result<(), Error> {
    if envelope.is_empty() {
        return Err(Error::Malformed {
            reason: "empty value",
        });
    }
    if envelope[0] != VERSION {
        return Err(Error::Malformed {
            reason: "unknown format version byte",
        });
    }
    if envelope.len() < OVERHEAD {
        return Err(Error::Malformed {
            reason: "shorter than the 45-byte minimum",
        });
    }
    Ok(())
}

/// Builds the associated data for a value: header, table, 0x00, column, 0x00, row id text.
fn associated_data(header: &[u8], loc: &FieldLocation<'_>) -> Vec<u8> {
    let mut aad = Vec::with_capacity(HEADER_LEN + loc.table.len() + loc.column.len() + 22);
    aad.extend_from_slice(header);
    aad.extend_from_slice(loc.table.as_bytes());
    aad.push(0);
    aad.extend_from_slice(loc.column.as_bytes());
    aad.push(0);
    aad.extend_from_slice(loc.row_id.to_string().as_bytes());
    aad
}

/// Encrypts `plaintext` for `loc` under the ring's encryption key with a fresh random nonce.
pub fn seal(ring: &KeyRing, loc: &FieldLocation<'_>, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
    seal_with(
        ring.encrypt_key().ok_or(Error::NoEncryptKey)?,
        loc,
        plaintext,
    )
}

/// Encrypts `plaintext` for `loc` under a given key with a fresh random nonce, counting
/// the encryption against the key's nonce budget.
pub fn seal_with(
    key: &FieldKey,
    loc: &FieldLocation<'_>,
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    key.reserve_encryption()?;
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    Ok(seal_with_nonce(key, nonce, loc, plaintext))
}

/// Encrypts with a caller-chosen nonce. Only for the FORMAT.md worked example and for
/// independent checks: reusing a nonce under a key destroys GCM's guarantees.
#[doc(hidden)]
pub fn seal_with_nonce(
    key: &FieldKey,
    nonce: [u8; NONCE_LEN],
    loc: &FieldLocation<'_>,
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.push(VERSION);
    out.extend_from_slice(key.id().as_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let aad = associated_data(&out[..HEADER_LEN], loc);
    let tag = key
        .cipher()
        .encrypt_inout_detached(
            &Nonce::from(nonce),
            &aad,
            (&mut out[HEADER_LEN + NONCE_LEN..]).into(),
        )
        .expect("AES-GCM encryption of a field value within size limits cannot fail");
    out.extend_from_slice(&tag);
    out
}

/// Decrypts an envelope found at `loc`, with the key its header names.
pub fn open(ring: &KeyRing, loc: &FieldLocation<'_>, envelope: &[u8]) -> Result<Plaintext, Error> {
    let key_id = key_id(envelope)?;
    let key = ring.get(&key_id).ok_or(Error::UnknownKey { key_id })?;
    open_with(key, loc, envelope)
}

/// Decrypts with a given key; the envelope's header must name that key.
pub fn open_with(
    key: &FieldKey,
    loc: &FieldLocation<'_>,
    envelope: &[u8],
) -> Result<Plaintext, Error> {
    let key_id = key_id(envelope)?;
    if key_id != key.id() {
        return Err(Error::UnknownKey { key_id });
    }
    let nonce: [u8; NONCE_LEN] = envelope[HEADER_LEN..HEADER_LEN + NONCE_LEN]
        .try_into()
        .expect("12 bytes");
    let body = &envelope[HEADER_LEN + NONCE_LEN..];
    let (ciphertext, tag) = body.split_at(body.len() - TAG_LEN);
    let tag: [u8; TAG_LEN] = tag.try_into().expect("16 bytes");
    let tag = Tag::<aes_gcm::Aes256Gcm>::from(tag);
    let aad = associated_data(&envelope[..HEADER_LEN], loc);
    let mut buf = Zeroizing::new(ciphertext.to_vec());
    key.cipher()
        .decrypt_inout_detached(&Nonce::from(nonce), &aad, buf.as_mut_slice().into(), &tag)
        .map_err(|_| Error::Tampered { key_id })?;
    Ok(Plaintext::new(std::mem::take(&mut *buf)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyState;
    use crate::secret::KeyMaterial;
    use proptest::prelude::*;

    fn ring_with_key() -> (KeyRing, Uuid) {
        let id = Uuid::new_v4();
        let mut ring = KeyRing::default();
        ring.insert(FieldKey::new(
            id,
            KeyState::Active,
            &KeyMaterial::generate(),
            0,
            1 << 32,
        ));
        ring.set_encrypt_key(id).unwrap();
        (ring, id)
    }

    const LOC: FieldLocation<'static> = FieldLocation {
        table: "demo.users",
        column: "email",
        row_id: 42,
    };

    #[test]
    fn envelope_round_trips_and_names_its_key() {
        let (ring, id) = ring_with_key();
        let env = seal(&ring, &LOC, b"alice@example.com").unwrap();
        assert_eq!(env[0], VERSION);
        assert_eq!(key_id(&env).unwrap(), id);
        assert_eq!(env.len(), OVERHEAD + 17);
        assert_eq!(
            open(&ring, &LOC, &env).unwrap().as_bytes(),
            b"alice@example.com"
        );
    }

    #[test]
    fn empty_and_one_mebibyte_plaintexts_work() {
        let (ring, _) = ring_with_key();
        let env = seal(&ring, &LOC, b"").unwrap();
        assert_eq!(env.len(), OVERHEAD);
        assert!(open(&ring, &LOC, &env).unwrap().is_empty());
        let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let env = seal(&ring, &LOC, &big).unwrap();
        assert_eq!(open(&ring, &LOC, &env).unwrap().as_bytes(), &big[..]);
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let (ring, _) = ring_with_key();
        let env = seal(&ring, &LOC, b"+1 555 0100").unwrap();
        for byte in 0..env.len() {
            for bit in 0..8 {
                let mut bad = env.clone();
                bad[byte] ^= 1 << bit;
                let err = open(&ring, &LOC, &bad).unwrap_err();
                match byte {
                    0 => assert!(matches!(err, Error::Malformed { .. }), "{err}"),
                    1..17 => assert!(matches!(err, Error::UnknownKey { .. }), "{err}"),
                    _ => assert!(matches!(err, Error::Tampered { .. }), "{err}"),
                }
            }
        }
    }

    #[test]
    fn envelope_rejects_ciphertext_moved_to_another_row_column_or_table() {
        let (ring, _) = ring_with_key();
        let env = seal(&ring, &LOC, b"alice@example.com").unwrap();
        for moved in [
            FieldLocation { row_id: 43, ..LOC },
            FieldLocation {
                column: "phone",
                ..LOC
            },
            FieldLocation {
                table: "demo.agents",
                ..LOC
            },
            // Without separators "ab"+"c" and "a"+"bc" would collide.
            FieldLocation {
                table: "demo.user",
                column: "semail",
                ..LOC
            },
        ] {
            assert!(matches!(
                open(&ring, &moved, &env),
                Err(Error::Tampered { .. })
            ));
        }
    }

    #[test]
    fn unknown_key_is_rejected_with_its_id_in_the_error() {
        let (ring, _) = ring_with_key();
        let (other, other_id) = ring_with_key();
        let env = seal(&other, &LOC, b"x").unwrap();
        let err = open(&ring, &LOC, &env).unwrap_err();
        assert_eq!(err, Error::UnknownKey { key_id: other_id });
        assert!(err.to_string().contains(&other_id.to_string()));
    }

    #[test]
    fn nonce_budget_is_enforced() {
        let id = Uuid::new_v4();
        let mut ring = KeyRing::default();
        ring.insert(FieldKey::new(
            id,
            KeyState::Active,
            &KeyMaterial::generate(),
            9,
            10,
        ));
        ring.set_encrypt_key(id).unwrap();
        assert!(seal(&ring, &LOC, b"a").is_ok());
        assert_eq!(
            seal(&ring, &LOC, b"b").unwrap_err(),
            Error::BudgetExhausted { key_id: id }
        );
        assert_eq!(ring.take_encryption_counts(), vec![(id, 1)]);
    }

    proptest! {
        #[test]
        fn random_inputs_are_rejected_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (ring, _) = ring_with_key();
            prop_assert!(open(&ring, &LOC, &bytes).is_err());
        }

        #[test]
        fn truncated_envelopes_are_rejected_without_panic(len in 0usize..80, cut in 0usize..80) {
            let (ring, _) = ring_with_key();
            let pt = vec![7u8; len];
            let env = seal(&ring, &LOC, &pt).unwrap();
            let cut = cut.min(env.len() - 1);
            prop_assert!(open(&ring, &LOC, &env[..cut]).is_err());
        }

        #[test]
        fn round_trip_holds_for_any_plaintext_and_location(pt in proptest::collection::vec(any::<u8>(), 0..600), row in any::<i64>()) {
            let (ring, _) = ring_with_key();
            let loc = FieldLocation { row_id: row, ..LOC };
            let env = seal(&ring, &loc, &pt).unwrap();
            let back = open(&ring, &loc, &env).unwrap();
            prop_assert_eq!(back.as_bytes(), &pt[..]);
        }
    }
}
