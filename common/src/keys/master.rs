//! The master key: supplied from outside the database and used only to wrap data keys (and
//! to derive the batch orders' message key). Two providers: `local`, an environment
//! variable (`REKEY_MASTER_KEY`, base64 of 32 bytes) or a file (`REKEY_MASTER_KEY_FILE`,
//! the same base64 text), whose bytes are in this process's memory; and `pkcs11`, a key
//! inside an HSM or KMS token ([`super::pkcs11`]) that wraps and unwraps there and whose
//! bytes this process never holds.

use std::fmt;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::secret::{KEY_LEN, KeyMaterial};

/// Why a master key could not be had. Texts name the setting, never the key.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error(
        "no master key: set REKEY_MASTER_KEY (base64 of 32 bytes) or REKEY_MASTER_KEY_FILE (a file holding it)"
    )]
    Missing,
    #[error("{source_name} is not valid base64 (expected the base64 text of 32 random bytes)")]
    NotBase64 { source_name: String },
    #[error(
        "{source_name} decodes to {len} bytes; a master key must be exactly 32 bytes (AES-256)"
    )]
    WrongLength { source_name: String, len: usize },
    #[error("cannot read {source_name}: {error}")]
    Unreadable {
        source_name: String,
        error: std::io::Error,
    },
    #[error(
        "{source_name} can be read by other users (mode {mode:04o}): `chmod 600` it, or pass --allow-insecure-key-file (REKEY_ALLOW_INSECURE_KEY_FILE=1) if a group must read it"
    )]
    InsecureFile { source_name: String, mode: u32 },
    /// The PKCS#11 token holding the master key could not be used.
    #[error(transparent)]
    Token(#[from] super::pkcs11::TokenError),
}

/// Set by `--allow-insecure-key-file`: key files readable by group or others are accepted.
static ALLOW_INSECURE_KEY_FILES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Accept master key files that group or others can read (the binaries' flag).
pub fn allow_insecure_key_files() {
    ALLOW_INSECURE_KEY_FILES.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// A master key: its id, and either its bytes (`local`) or the token that holds it
/// (`pkcs11`).
pub struct MasterKey {
    id: Uuid,
    inner: Inner,
    /// The input keying material of the batch orders' message key: the local key's bytes
    /// (as always), or a token key's CMAC of a fixed label, asked of the token once here.
    message_ikm: Zeroizing<Vec<u8>>,
}

enum Inner {
    Local(KeyMaterial),
    Token(std::sync::Arc<super::pkcs11::TokenKey>),
}

impl MasterKey {
    /// A local master key.
    pub fn new(material: KeyMaterial) -> Self {
        Self {
            id: fingerprint(&material),
            message_ikm: Zeroizing::new(material.expose().to_vec()),
            inner: Inner::Local(material),
        }
    }

    /// A master key inside a PKCS#11 token (opened: its checks passed).
    pub fn from_token(key: super::pkcs11::TokenKey) -> Result<Self, MasterKeyError> {
        Ok(Self {
            id: key.id(),
            message_ikm: key.message_key_material()?,
            inner: Inner::Token(std::sync::Arc::new(key)),
        })
    }

    /// The key's id: for a local key its fingerprint, the first 16 bytes of
    /// SHA-256("rekey master key v1" || key); for a token key derived from the token's
    /// serial number and the key's CKA_ID ([`super::pkcs11::token_key_id`]). Stored as each
    /// data key's wrapping key id, so a wrong master key is recognised as such before any
    /// unwrap is tried.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// `local` or `pkcs11`.
    pub fn provider(&self) -> &'static str {
        match self.inner {
            Inner::Local(_) => "local",
            Inner::Token(_) => "pkcs11",
        }
    }

    /// Which key this is, for messages and `keys status` (never its bytes).
    pub fn describe(&self) -> String {
        match &self.inner {
            Inner::Local(_) => format!("local key {}", self.id),
            Inner::Token(t) => t.describe(),
        }
    }

    /// The token key, for a `pkcs11` master key.
    pub fn token(&self) -> Option<&super::pkcs11::TokenKey> {
        match &self.inner {
            Inner::Local(_) => None,
            Inner::Token(t) => Some(t),
        }
    }

    /// The local key's bytes; `None` for a token key, whose bytes nobody can read.
    pub fn local_material(&self) -> Option<&KeyMaterial> {
        match &self.inner {
            Inner::Local(m) => Some(m),
            Inner::Token(_) => None,
        }
    }

    /// The input keying material of the batch orders' message key.
    pub fn message_key_ikm(&self) -> &[u8] {
        &self.message_ikm
    }

    /// Wraps data key `key_id`: `nonce || ciphertext || tag` (FORMAT.md), by this process
    /// (local) or by the token (pkcs11), the same layout and associated data either way.
    pub fn wrap_data_key(
        &self,
        key_id: Uuid,
        key: &KeyMaterial,
    ) -> Result<Vec<u8>, MasterKeyError> {
        match &self.inner {
            Inner::Local(m) => Ok(super::wrap::wrap(
                m,
                self.id,
                super::KeyKind::Data,
                key_id,
                key,
            )),
            Inner::Token(t) => {
                let aad = super::wrap::associated_data(super::KeyKind::Data, key_id, self.id);
                Ok(t.wrap(&aad, key.expose())?)
            }
        }
    }

    /// Unwraps data key `key_id`. A wrapped key that does not authenticate is
    /// [`DataKeyUnwrapError::Unwrap`]; a token that cannot be used, [`DataKeyUnwrapError::Token`].
    pub fn unwrap_data_key(
        &self,
        key_id: Uuid,
        wrapped: &[u8],
    ) -> Result<KeyMaterial, DataKeyUnwrapError> {
        match &self.inner {
            Inner::Local(m) => Ok(super::wrap::unwrap(
                m,
                self.id,
                super::KeyKind::Data,
                key_id,
                wrapped,
            )?),
            Inner::Token(t) => {
                let aad = super::wrap::associated_data(super::KeyKind::Data, key_id, self.id);
                match t.unwrap(&aad, wrapped)? {
                    Some(bytes) => Ok(KeyMaterial::from_slice(&bytes).expect("32 bytes checked")),
                    None => Err(DataKeyUnwrapError::Unwrap(super::wrap::UnwrapError {
                        kind: super::KeyKind::Data,
                        key_id,
                        wrapping_key_id: self.id,
                    })),
                }
            }
        }
    }
}

/// Why a data key could not be unwrapped.
#[derive(Debug, thiserror::Error)]
pub enum DataKeyUnwrapError {
    #[error(transparent)]
    Unwrap(#[from] super::wrap::UnwrapError),
    #[error(transparent)]
    Token(#[from] super::pkcs11::TokenError),
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .field("provider", &self.provider())
            .field("material", &"[REDACTED]")
            .finish()
    }
}

/// Computes a master key's fingerprint id.
pub fn fingerprint(material: &KeyMaterial) -> Uuid {
    let mut h = Sha256::new();
    h.update(b"rekey master key v1");
    h.update(material.expose());
    let digest = h.finalize();
    Uuid::from_bytes(digest[..16].try_into().expect("16 bytes"))
}

/// Where a master key comes from.
pub trait MasterKeyProvider: fmt::Debug + Send + Sync {
    /// A description of the source for messages (never the key).
    fn describe(&self) -> String;
    fn load(&self) -> Result<MasterKey, MasterKeyError>;
}

/// A master key held in an environment variable's value, base64 encoded.
pub struct EnvMasterKey {
    var: String,
    value: SecretString,
}

impl EnvMasterKey {
    pub fn new(var: impl Into<String>, value: SecretString) -> Self {
        Self {
            var: var.into(),
            value,
        }
    }
}

impl fmt::Debug for EnvMasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnvMasterKey({})", self.var)
    }
}

impl MasterKeyProvider for EnvMasterKey {
    fn describe(&self) -> String {
        self.var.clone()
    }

    fn load(&self) -> Result<MasterKey, MasterKeyError> {
        decode_base64_key(&self.var, self.value.expose_secret())
    }
}

/// A master key held in a file as base64 text (surrounding whitespace ignored).
/// The file must not be readable by group or others, unless allowed
/// ([`FileMasterKey::allow_insecure`], `--allow-insecure-key-file`).
#[derive(Debug)]
pub struct FileMasterKey {
    var: String,
    path: PathBuf,
    allow_insecure: bool,
}

impl FileMasterKey {
    pub fn new(var: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            var: var.into(),
            path: path.into(),
            allow_insecure: false,
        }
    }

    /// Accepts a file that group or others can read.
    pub fn allow_insecure(mut self, allow: bool) -> Self {
        self.allow_insecure = allow;
        self
    }
}

impl MasterKeyProvider for FileMasterKey {
    fn describe(&self) -> String {
        format!("{} ({})", self.var, self.path.display())
    }

    fn load(&self) -> Result<MasterKey, MasterKeyError> {
        use std::os::unix::fs::PermissionsExt;
        let allowed = self.allow_insecure
            || ALLOW_INSECURE_KEY_FILES.load(std::sync::atomic::Ordering::Relaxed);
        if !allowed && let Ok(meta) = std::fs::metadata(&self.path) {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(MasterKeyError::InsecureFile {
                    source_name: self.describe(),
                    mode,
                });
            }
        }
        let text = Zeroizing::new(std::fs::read_to_string(&self.path).map_err(|error| {
            MasterKeyError::Unreadable {
                source_name: self.describe(),
                error,
            }
        })?);
        decode_base64_key(&self.describe(), text.trim())
    }
}

/// A master key inside a PKCS#11 token (`REKEY_PKCS11_*`, `[pkcs11]` in rekey.toml).
#[derive(Debug)]
pub struct Pkcs11MasterKey {
    pub settings: super::pkcs11::TokenSettings,
}

impl MasterKeyProvider for Pkcs11MasterKey {
    fn describe(&self) -> String {
        format!(
            "pkcs11 key '{}' in {} (module {})",
            self.settings.key_label,
            self.settings.token,
            self.settings.module.display()
        )
    }

    fn load(&self) -> Result<MasterKey, MasterKeyError> {
        MasterKey::from_token(super::pkcs11::TokenKey::open(&self.settings)?)
    }
}

/// Decodes base64 text into a 32-byte master key.
pub fn decode_base64_key(source_name: &str, text: &str) -> Result<MasterKey, MasterKeyError> {
    let bytes =
        Zeroizing::new(
            STANDARD
                .decode(text.trim())
                .map_err(|_| MasterKeyError::NotBase64 {
                    source_name: source_name.to_owned(),
                })?,
        );
    if bytes.len() != KEY_LEN {
        return Err(MasterKeyError::WrongLength {
            source_name: source_name.to_owned(),
            len: bytes.len(),
        });
    }
    Ok(MasterKey::new(
        KeyMaterial::from_slice(&bytes).expect("length checked"),
    ))
}

/// A new random master key as base64 text, for `rekey keys new-master` and tests.
pub fn generate_base64() -> SecretString {
    let key = KeyMaterial::generate();
    SecretString::from(STANDARD.encode(key.expose()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_master_key_errors_name_the_setting_not_the_value() {
        let bad = EnvMasterKey::new("REKEY_MASTER_KEY", SecretString::from("not base64!!"));
        let err = bad.load().unwrap_err().to_string();
        assert!(err.contains("REKEY_MASTER_KEY"), "{err}");
        assert!(!err.contains("not base64!!"), "{err}");

        let short = EnvMasterKey::new(
            "REKEY_MASTER_KEY",
            SecretString::from(STANDARD.encode([1u8; 16])),
        );
        let err = short.load().unwrap_err().to_string();
        assert!(
            err.contains("16 bytes") && err.contains("exactly 32"),
            "{err}"
        );
    }

    #[test]
    fn file_master_key_reads_base64_text() {
        let dir = std::env::temp_dir().join(format!("rekey-mk-{}", Uuid::new_v4()));
        std::fs::write(&dir, format!("{}\n", generate_base64().expose_secret())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        // Readable by others: refused, naming the file and its mode.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = FileMasterKey::new("REKEY_MASTER_KEY_FILE", &dir)
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mode 0644") && err.contains("REKEY_MASTER_KEY_FILE"),
            "{err}"
        );
        assert!(
            FileMasterKey::new("REKEY_MASTER_KEY_FILE", &dir)
                .allow_insecure(true)
                .load()
                .is_ok()
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o600)).unwrap();
        let key = FileMasterKey::new("REKEY_MASTER_KEY_FILE", &dir)
            .load()
            .unwrap();
        assert_eq!(key.id(), fingerprint(key.local_material().unwrap()));
        std::fs::remove_file(&dir).unwrap();
        let err = FileMasterKey::new("REKEY_MASTER_KEY_FILE", &dir)
            .load()
            .unwrap_err();
        assert!(err.to_string().contains("REKEY_MASTER_KEY_FILE"));
    }
}
