//! Types that hold key material and plaintext. Their `Debug` is redacted, they have no
//! `Display`, and their bytes are zeroized when they are dropped, so that a stray `{:?}`
//! in a log line or an error cannot leak a secret.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Length of every key rekey handles: AES-256.
pub const KEY_LEN: usize = 32;

/// 256 bits of key material: a master, data or field key in the clear.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct KeyMaterial([u8; KEY_LEN]);

impl KeyMaterial {
    /// Copies key material in place (no intermediate copy on the stack); the caller's own
    /// buffer should be a `Zeroizing` one.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        let mut k = Self([0; KEY_LEN]);
        k.0.copy_from_slice(bytes);
        k
    }

    /// Copies key material out of a slice, refusing any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self::from_bytes(bytes))
    }

    /// Fresh random key material from the operating system's generator, drawn into the
    /// key's own buffer.
    pub fn generate() -> Self {
        use rand::TryRng;
        let mut k = Self([0; KEY_LEN]);
        rand::rngs::SysRng
            .try_fill_bytes(&mut k.0)
            .expect("the operating system's random number generator failed");
        k
    }

    /// The raw bytes, for the cipher only.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial([REDACTED])")
    }
}

/// A decrypted field value. Zeroized on drop; `Debug` shows only its length.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Plaintext(Zeroizing<Vec<u8>>);

impl Plaintext {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&[u8]> for Plaintext {
    fn from(bytes: &[u8]) -> Self {
        Self::new(bytes.to_vec())
    }
}

impl From<Vec<u8>> for Plaintext {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Plaintext([REDACTED; {} bytes])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_of_secrets_is_redacted() {
        let key = KeyMaterial::from_bytes(&[0xAB; KEY_LEN]);
        let text = Plaintext::from(&b"secret value"[..]);
        let shown = format!("{key:?} {text:?}");
        assert!(!shown.to_lowercase().contains("ab, "), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
        assert!(!shown.contains("secret value"), "{shown}");
        assert!(shown.contains("REDACTED"));
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            KeyMaterial::generate().expose(),
            KeyMaterial::generate().expose()
        );
    }
}
