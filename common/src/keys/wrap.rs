//! The wrapped-key format: a data key under the master key, or a field key under a data
//! key, is stored as `nonce (12) || ciphertext (32) || tag (16)`, AES-256-GCM, with
//! associated data `0x01 || kind || wrapped key id (16) || wrapping key id (16)` where kind
//! is the ASCII byte `D` (data key) or `F` (field key). A wrapped key therefore cannot be
//! swapped for another key's, or presented as a different kind. No I/O here.

use aes_gcm::aead::AeadInOut;
use aes_gcm::aead::Tag;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use rand::Rng;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::KeyKind;
use crate::secret::{KEY_LEN, KeyMaterial};

pub const WRAPPED_LEN: usize = 12 + KEY_LEN + 16;
const WRAP_VERSION: u8 = 0x01;

/// The wrapped key failed authentication: wrong wrapping key, or altered bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "could not unwrap {kind} key {key_id} with key {wrapping_key_id}: wrong wrapping key or altered wrapped bytes"
)]
pub struct UnwrapError {
    pub kind: KeyKind,
    pub key_id: Uuid,
    pub wrapping_key_id: Uuid,
}

/// The associated data of a wrapped key.
pub fn associated_data(kind: KeyKind, key_id: Uuid, wrapping_key_id: Uuid) -> [u8; 34] {
    let mut aad = [0u8; 34];
    aad[0] = WRAP_VERSION;
    aad[1] = match kind {
        KeyKind::Data => b'D',
        KeyKind::Field => b'F',
    };
    aad[2..18].copy_from_slice(key_id.as_bytes());
    aad[18..34].copy_from_slice(wrapping_key_id.as_bytes());
    aad
}

/// Wraps `key` (whose id is `key_id`) under `wrapping` (whose id is `wrapping_key_id`).
pub fn wrap(
    wrapping: &KeyMaterial,
    wrapping_key_id: Uuid,
    kind: KeyKind,
    key_id: Uuid,
    key: &KeyMaterial,
) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    rand::rng().fill_bytes(&mut nonce);
    wrap_with_nonce(wrapping, wrapping_key_id, kind, key_id, key, nonce)
}

/// Wraps with a caller-chosen nonce: for the FORMAT.md worked example only.
#[doc(hidden)]
pub fn wrap_with_nonce(
    wrapping: &KeyMaterial,
    wrapping_key_id: Uuid,
    kind: KeyKind,
    key_id: Uuid,
    key: &KeyMaterial,
    nonce: [u8; 12],
) -> Vec<u8> {
    let cipher = Aes256Gcm::new(wrapping.expose().into());
    let aad = associated_data(kind, key_id, wrapping_key_id);
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(key.expose());
    let tag = cipher
        .encrypt_inout_detached(&Nonce::from(nonce), &aad, (&mut out[12..]).into())
        .expect("wrapping 32 bytes cannot fail");
    out.extend_from_slice(&tag);
    out
}

/// Unwraps a stored key, authenticating its id, kind and wrapping key id.
pub fn unwrap(
    wrapping: &KeyMaterial,
    wrapping_key_id: Uuid,
    kind: KeyKind,
    key_id: Uuid,
    wrapped: &[u8],
) -> Result<KeyMaterial, UnwrapError> {
    let err = UnwrapError {
        kind,
        key_id,
        wrapping_key_id,
    };
    if wrapped.len() != WRAPPED_LEN {
        return Err(err);
    }
    let cipher = Aes256Gcm::new(wrapping.expose().into());
    let aad = associated_data(kind, key_id, wrapping_key_id);
    let nonce: [u8; 12] = wrapped[..12].try_into().expect("12 bytes");
    let tag: [u8; 16] = wrapped[12 + KEY_LEN..].try_into().expect("16 bytes");
    let tag = Tag::<Aes256Gcm>::from(tag);
    let mut buf = Zeroizing::new([0u8; KEY_LEN]);
    buf.copy_from_slice(&wrapped[12..12 + KEY_LEN]);
    cipher
        .decrypt_inout_detached(&Nonce::from(nonce), &aad, buf.as_mut_slice().into(), &tag)
        .map_err(|_| err)?;
    Ok(KeyMaterial::from_bytes(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_key_is_bound_to_its_id_kind_and_wrapping_key() {
        let kek = KeyMaterial::generate();
        let (kek_id, id) = (Uuid::new_v4(), Uuid::new_v4());
        let key = KeyMaterial::generate();
        let w = wrap(&kek, kek_id, KeyKind::Field, id, &key);
        assert_eq!(w.len(), WRAPPED_LEN);
        let back = unwrap(&kek, kek_id, KeyKind::Field, id, &w).unwrap();
        assert_eq!(back.expose(), key.expose());
        assert!(unwrap(&kek, kek_id, KeyKind::Data, id, &w).is_err());
        assert!(unwrap(&kek, kek_id, KeyKind::Field, Uuid::new_v4(), &w).is_err());
        assert!(unwrap(&kek, Uuid::new_v4(), KeyKind::Field, id, &w).is_err());
        assert!(unwrap(&KeyMaterial::generate(), kek_id, KeyKind::Field, id, &w).is_err());
        for i in 0..w.len() {
            let mut bad = w.clone();
            bad[i] ^= 0x01;
            assert!(unwrap(&kek, kek_id, KeyKind::Field, id, &bad).is_err());
        }
        assert!(unwrap(&kek, kek_id, KeyKind::Field, id, &w[..59]).is_err());
    }
}
