//! The master key: supplied from outside the database and used only to wrap data keys.
//! A provider is a trait so that a cloud KMS or Vault can stand behind it later; today
//! there is an environment variable (`REKEY_MASTER_KEY`, base64 of 32 bytes) and a file
//! (`REKEY_MASTER_KEY_FILE`, holding the same base64 text).

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
}

/// Set by `--allow-insecure-key-file`: key files readable by group or others are accepted.
static ALLOW_INSECURE_KEY_FILES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Accept master key files that group or others can read (the binaries' flag).
pub fn allow_insecure_key_files() {
    ALLOW_INSECURE_KEY_FILES.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// An unwrapped master key and its fingerprint id.
pub struct MasterKey {
    id: Uuid,
    material: KeyMaterial,
}

impl MasterKey {
    pub fn new(material: KeyMaterial) -> Self {
        Self {
            id: fingerprint(&material),
            material,
        }
    }

    /// The key's fingerprint: the first 16 bytes of SHA-256("rekey master key v1" || key).
    /// Stored as each data key's wrapping key id, so a wrong master key is recognised as
    /// such before any unwrap is tried.
    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn material(&self) -> &KeyMaterial {
        &self.material
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
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
        assert_eq!(key.id(), fingerprint(key.material()));
        std::fs::remove_file(&dir).unwrap();
        let err = FileMasterKey::new("REKEY_MASTER_KEY_FILE", &dir)
            .load()
            .unwrap_err();
        assert!(err.to_string().contains("REKEY_MASTER_KEY_FILE"));
    }
}
