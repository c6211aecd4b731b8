//! The master key inside a PKCS#11 token: an HSM (Thales Luna, Entrust nShield, YubiHSM 2),
//! a cloud HSM or KMS through its PKCS#11 library (AWS CloudHSM, Google Cloud KMS, Azure
//! Managed HSM), or SoftHSM2 for trials and tests. The key is generated in the token as a
//! sensitive, non-extractable AES-256 token object and used there: data keys are wrapped and
//! unwrapped by `C_Encrypt`/`C_Decrypt` with `CKM_AES_GCM` (the same layout and associated
//! data as a local master key's, FORMAT.md), and the batch orders' message key is derived
//! from a `CKM_AES_CMAC` of a fixed label. The key's bytes never reach this process.
//!
//! One session per process, opened on first use and reused; a session the token closed
//! (or a library finalized under it) is reopened once per operation. A PIN the token
//! refuses is never tried again: tokens lock their user after a few wrong PINs.

use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use rand::Rng;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

/// The label whose CMAC under the token key is the input of the message key's derivation.
pub const MESSAGE_KEY_LABEL: &[u8] = b"rekey message key v1";

/// Calls into the token by this process (wraps, unwraps, CMACs, session openings): the
/// worker's hot path must not make any (it holds unwrapped data and field keys in its ring).
static TOKEN_CALLS: AtomicU64 = AtomicU64::new(0);

/// How many calls this process made into a token so far.
pub fn token_calls() -> u64 {
    TOKEN_CALLS.load(Ordering::Relaxed)
}

/// Which token: by its label (what operators set with `softhsm2-util --init-token --label`
/// or their HSM's tools) or by slot number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    Label(String),
    Slot(u64),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "token labelled '{l}'"),
            TokenSelector::Slot(s) => write!(f, "the token in slot {s}"),
        }
    }
}

/// The PKCS#11 settings: `REKEY_PKCS11_MODULE`, `REKEY_PKCS11_TOKEN_LABEL` (or
/// `REKEY_PKCS11_SLOT`), `REKEY_PKCS11_PIN_FILE`, `REKEY_PKCS11_KEY_LABEL`, or the
/// `[pkcs11]` table of `rekey.toml`. The PIN itself is only ever in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSettings {
    pub module: PathBuf,
    pub token: TokenSelector,
    pub pin_file: PathBuf,
    pub key_label: String,
}

impl TokenSettings {
    /// The same token, another key label (the target of `rotate-master`).
    pub fn with_key_label(&self, label: &str) -> Self {
        Self {
            key_label: label.to_owned(),
            ..self.clone()
        }
    }
}

/// Why a token could not be used. Each names the setting to fix; none holds a PIN or key.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "REKEY_PKCS11_MODULE: no PKCS#11 module at {module} (install your token's library, e.g. Debian's softhsm2 at /usr/lib/softhsm/libsofthsm2.so, or fix the path)"
    )]
    ModuleMissing { module: PathBuf },
    #[error("REKEY_PKCS11_MODULE: cannot load {module} as a PKCS#11 module: {error}")]
    ModuleUnloadable { module: PathBuf, error: String },
    #[error("REKEY_PKCS11_MODULE: {module} failed to initialize: {error}")]
    Initialize { module: PathBuf, error: String },
    #[error(
        "REKEY_PKCS11_TOKEN_LABEL / REKEY_PKCS11_SLOT: {wanted} is not present; the module {module} has {present}"
    )]
    TokenNotPresent {
        wanted: String,
        module: PathBuf,
        present: String,
    },
    #[error("REKEY_PKCS11_PIN_FILE: {detail}")]
    PinFile { detail: String },
    #[error(
        "REKEY_PKCS11_PIN_FILE: token '{token}' refused the PIN in {pin_file}. rekey does not try again: each wrong PIN brings the token closer to locking its user. Fix the file, then run the command once more"
    )]
    PinIncorrect { token: String, pin_file: PathBuf },
    #[error(
        "token '{token}' has locked its user PIN: its security officer must unlock it (e.g. `softhsm2-util` / your HSM's tools); rekey did not try to log in"
    )]
    PinLocked { token: String },
    #[error(
        "token '{token}' says one more wrong PIN locks its user: rekey will not try the PIN in REKEY_PKCS11_PIN_FILE; check it, and log in once with your token's tools to reset the count"
    )]
    PinFinalTry { token: String },
    #[error(
        "REKEY_PKCS11_KEY_LABEL: token '{token}' has no AES secret key labelled '{label}' (create one with `rekey keys new-master --pkcs11 --label {label}`)"
    )]
    KeyNotFound { token: String, label: String },
    #[error(
        "REKEY_PKCS11_KEY_LABEL: token '{token}' has {n} secret keys labelled '{label}'; a master key's label must name exactly one"
    )]
    KeyAmbiguous {
        token: String,
        label: String,
        n: usize,
    },
    #[error(
        "REKEY_PKCS11_KEY_LABEL: token '{token}' already holds a key labelled '{label}'; choose another label (a master key is never replaced in place)"
    )]
    KeyExists { token: String, label: String },
    #[error(
        "REKEY_PKCS11_KEY_LABEL: key '{label}' in token '{token}' is {problem}: the token would let its bytes out, so rekey refuses it as a master key. Generate one with `rekey keys new-master --pkcs11` (CKA_SENSITIVE true, CKA_EXTRACTABLE false)"
    )]
    KeyExportable {
        token: String,
        label: String,
        problem: &'static str,
    },
    #[error(
        "REKEY_PKCS11_KEY_LABEL: key '{label}' in token '{token}' is not an AES-256 key ({found})"
    )]
    KeyNotAes256 {
        token: String,
        label: String,
        found: String,
    },
    #[error(
        "token '{token}' does not offer {mechanism}, which rekey's PKCS#11 master key needs (AES-GCM to wrap data keys, AES-CMAC to derive the message key); point REKEY_PKCS11_MODULE / REKEY_PKCS11_TOKEN_LABEL at a token that does"
    )]
    MechanismMissing {
        token: String,
        mechanism: &'static str,
    },
    #[error("token '{token}': {op} failed: {error}")]
    Operation {
        token: String,
        op: &'static str,
        error: String,
    },
}

impl TokenError {
    /// Whether this failure means the session (or the library under it) is gone and a new
    /// one may work.
    fn session_lost(e: &CkError) -> bool {
        matches!(
            e,
            CkError::Pkcs11(
                RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::CryptokiNotInitialized
                    | RvError::DeviceRemoved
                    | RvError::DeviceError
                    | RvError::TokenNotPresent
                    | RvError::UserNotLoggedIn
                    | RvError::ObjectHandleInvalid
                    | RvError::KeyHandleInvalid,
                _
            )
        )
    }
}

/// An open session on the token, logged in, with the master key's handle.
struct Open {
    // Dropped before the context (field order): the session closes first.
    session: Session,
    key: ObjectHandle,
    _ctx: Pkcs11,
}

/// A master key held by a PKCS#11 token.
pub struct TokenKey {
    settings: TokenSettings,
    id: Uuid,
    token_label: String,
    serial: String,
    open: Mutex<Option<Open>>,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey")
            .field("id", &self.id)
            .field("token", &self.token_label)
            .field("serial", &self.serial)
            .field("key_label", &self.settings.key_label)
            .finish()
    }
}

/// The master key id of a token key: the first 16 bytes of
/// SHA-256("rekey pkcs11 master key v1" || serial || 0x00 || CKA_ID), FORMAT.md. Nobody
/// can hash bytes nobody can read; the token's serial number and the key's CKA_ID name it
/// for as long as the token keeps it.
pub fn token_key_id(serial: &str, cka_id: &[u8]) -> Uuid {
    let mut h = Sha256::new();
    h.update(b"rekey pkcs11 master key v1");
    h.update(serial.trim().as_bytes());
    h.update([0u8]);
    h.update(cka_id);
    let d = h.finalize();
    Uuid::from_bytes(d[..16].try_into().expect("16 bytes"))
}

fn op_error(token: &str, op: &'static str, e: CkError) -> TokenError {
    TokenError::Operation {
        token: token.to_owned(),
        op,
        error: e.to_string(),
    }
}

fn read_pin(settings: &TokenSettings) -> Result<SecretString, TokenError> {
    let path = settings.pin_file.display().to_string();
    crate::config::read_secret_file("REKEY_PKCS11_PIN_FILE", &path).map_err(|e| {
        TokenError::PinFile {
            detail: format!("{e:#}")
                .trim_start_matches("REKEY_PKCS11_PIN_FILE: ")
                .to_owned(),
        }
    })
}

/// The module loaded and initialized, and the slot of the configured token with its label
/// and serial number.
fn find_token(settings: &TokenSettings) -> Result<(Pkcs11, Slot, String, String), TokenError> {
    TOKEN_CALLS.fetch_add(1, Ordering::Relaxed);
    if !settings.module.exists() {
        return Err(TokenError::ModuleMissing {
            module: settings.module.clone(),
        });
    }
    let ctx = Pkcs11::new(&settings.module).map_err(|e| TokenError::ModuleUnloadable {
        module: settings.module.clone(),
        error: e.to_string(),
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(TokenError::Initialize {
                module: settings.module.clone(),
                error: e.to_string(),
            });
        }
    }
    let init_err = |e: CkError| TokenError::Initialize {
        module: settings.module.clone(),
        error: e.to_string(),
    };
    let mut present = Vec::new();
    for slot in ctx.get_slots_with_token().map_err(init_err)? {
        let info = token_info(&ctx, slot).map_err(init_err)?;
        let label = info.label().trim().to_owned();
        let serial = info.serial_number().trim().to_owned();
        let chosen = match &settings.token {
            TokenSelector::Label(l) => label == l.trim(),
            TokenSelector::Slot(n) => slot.id() == *n,
        };
        if chosen {
            if info.user_pin_locked() {
                return Err(TokenError::PinLocked { token: label });
            }
            if info.user_pin_final_try() {
                return Err(TokenError::PinFinalTry { token: label });
            }
            return Ok((ctx, slot, label, serial));
        }
        present.push(format!("'{label}' in slot {}", slot.id()));
    }
    Err(TokenError::TokenNotPresent {
        wanted: settings.token.to_string(),
        module: settings.module.clone(),
        present: if present.is_empty() {
            "no initialized token".to_owned()
        } else {
            format!("tokens {}", present.join(", "))
        },
    })
}

/// `C_GetTokenInfo`, asked up to five times over a second while the token answers
/// `CKR_GENERAL_ERROR`/`CKR_FUNCTION_FAILED`: SoftHSM2's file store fails a read of the
/// token's record while another process rewrites it (each login does), as when two workers
/// start at once. Read-only; a PIN is never tried twice.
fn token_info(ctx: &Pkcs11, slot: Slot) -> Result<cryptoki::slot::TokenInfo, CkError> {
    let mut tries = 0;
    loop {
        match ctx.get_token_info(slot) {
            Err(CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _))
                if tries < 4 =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100 * tries));
            }
            other => return other,
        }
    }
}

/// A read-write session on the token, logged in as its user.
fn login(
    ctx: &Pkcs11,
    slot: Slot,
    token: &str,
    settings: &TokenSettings,
) -> Result<Session, TokenError> {
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| op_error(token, "C_OpenSession", e))?;
    let pin = read_pin(settings)?;
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(TokenError::PinIncorrect {
            token: token.to_owned(),
            pin_file: settings.pin_file.clone(),
        }),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(TokenError::PinLocked {
            token: token.to_owned(),
        }),
        Err(e) => Err(op_error(token, "C_Login", e)),
    }
}

fn secret_keys_labelled(
    session: &Session,
    token: &str,
    label: &str,
) -> Result<Vec<ObjectHandle>, TokenError> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| op_error(token, "C_FindObjects", e))
}

/// Checks the mechanisms rekey needs in the token's list (`C_GetMechanismList`: SoftHSM2's
/// `C_GetMechanismInfo` answers for a mechanism its `slots.mechanisms` leaves out). cryptoki
/// logs an error for every vendor mechanism in the list it does not know; the log filter's
/// floor silences `cryptoki::mechanism` (telemetry).
fn check_mechanisms(ctx: &Pkcs11, slot: Slot, token: &str) -> Result<(), TokenError> {
    let have = ctx
        .get_mechanism_list(slot)
        .map_err(|e| op_error(token, "C_GetMechanismList", e))?;
    for (m, name) in [
        (MechanismType::AES_GCM, "CKM_AES_GCM"),
        (MechanismType::AES_CMAC, "CKM_AES_CMAC"),
    ] {
        if !have.contains(&m) {
            return Err(TokenError::MechanismMissing {
                token: token.to_owned(),
                mechanism: name,
            });
        }
    }
    Ok(())
}

/// The key's CKA_ID, after checking it is a sensitive, non-extractable AES-256 key.
fn check_key(
    session: &Session,
    key: ObjectHandle,
    token: &str,
    label: &str,
) -> Result<Vec<u8>, TokenError> {
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Id,
            ],
        )
        .map_err(|e| op_error(token, "C_GetAttributeValue", e))?;
    let (mut key_type, mut len, mut sensitive, mut extractable, mut id) =
        (None, None, None, None, Vec::new());
    for a in attrs {
        match a {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::ValueLen(l) => len = Some(u64::from(l)),
            Attribute::Sensitive(b) => sensitive = Some(b),
            Attribute::Extractable(b) => extractable = Some(b),
            Attribute::Id(v) => id = v,
            _ => {}
        }
    }
    if key_type != Some(KeyType::AES) || len != Some(32) {
        return Err(TokenError::KeyNotAes256 {
            token: token.to_owned(),
            label: label.to_owned(),
            found: format!(
                "key type {}, {} bytes",
                key_type.map_or("unknown".to_owned(), |t| t.to_string()),
                len.map_or("unknown".to_owned(), |l| l.to_string())
            ),
        });
    }
    // A token that does not say is not trusted to keep the key in.
    if extractable != Some(false) {
        return Err(TokenError::KeyExportable {
            token: token.to_owned(),
            label: label.to_owned(),
            problem: "extractable (CKA_EXTRACTABLE is not false)",
        });
    }
    if sensitive != Some(true) {
        return Err(TokenError::KeyExportable {
            token: token.to_owned(),
            label: label.to_owned(),
            problem: "not sensitive (CKA_SENSITIVE is not true)",
        });
    }
    Ok(id)
}

impl TokenKey {
    /// Opens the configured token key: module, token, PIN, key label, its attributes and
    /// the mechanisms are checked here, before anything is changed.
    pub fn open(settings: &TokenSettings) -> Result<Self, TokenError> {
        let (ctx, slot, token_label, serial) = find_token(settings)?;
        check_mechanisms(&ctx, slot, &token_label)?;
        let session = login(&ctx, slot, &token_label, settings)?;
        let keys = secret_keys_labelled(&session, &token_label, &settings.key_label)?;
        let key = match keys.as_slice() {
            [] => {
                return Err(TokenError::KeyNotFound {
                    token: token_label,
                    label: settings.key_label.clone(),
                });
            }
            [k] => *k,
            more => {
                return Err(TokenError::KeyAmbiguous {
                    token: token_label,
                    label: settings.key_label.clone(),
                    n: more.len(),
                });
            }
        };
        let cka_id = check_key(&session, key, &token_label, &settings.key_label)?;
        let id = token_key_id(&serial, &cka_id);
        Ok(Self {
            settings: settings.clone(),
            id,
            token_label,
            serial,
            open: Mutex::new(Some(Open {
                session,
                key,
                _ctx: ctx,
            })),
        })
    }

    /// Generates a new master key in the token (`rekey keys new-master --pkcs11`): AES-256,
    /// a token object, private, sensitive, not extractable, for encrypt/decrypt (wrapping
    /// data keys) and sign (the CMAC the message key is derived from), with a random
    /// 16-byte CKA_ID. A label already in use is refused.
    pub fn generate(settings: &TokenSettings) -> Result<Self, TokenError> {
        let (ctx, slot, token_label, _serial) = find_token(settings)?;
        check_mechanisms(&ctx, slot, &token_label)?;
        let session = login(&ctx, slot, &token_label, settings)?;
        if !secret_keys_labelled(&session, &token_label, &settings.key_label)?.is_empty() {
            return Err(TokenError::KeyExists {
                token: token_label,
                label: settings.key_label.clone(),
            });
        }
        let mut cka_id = [0u8; 16];
        rand::rng().fill_bytes(&mut cka_id);
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Sign(true),
            Attribute::Verify(true),
            Attribute::Label(settings.key_label.as_bytes().to_vec()),
            Attribute::Id(cka_id.to_vec()),
        ];
        TOKEN_CALLS.fetch_add(1, Ordering::Relaxed);
        session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(|e| op_error(&token_label, "C_GenerateKey", e))?;
        drop(session);
        drop(ctx);
        Self::open(settings)
    }

    /// The master key id (FORMAT.md).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// "pkcs11 key 'L' in token 'T' (serial S)", for messages and `keys status`.
    pub fn describe(&self) -> String {
        format!(
            "pkcs11 key '{}' in token '{}' (serial {})",
            self.settings.key_label, self.token_label, self.serial
        )
    }

    pub fn key_label(&self) -> &str {
        &self.settings.key_label
    }

    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Fault point `pkcs11.lose_session` (the `failpoints` feature): when it fires, the
    /// PKCS#11 library is finalized under this process's open session, as a token that
    /// closed every session (or a library reset by its vendor's daemon) would leave it. The
    /// next operation must find the session gone and open a new one. Called where a key
    /// ring is about to be loaded (`store::load_ring`), the one place a running worker calls
    /// the token.
    pub fn fault_lose_session(&self) {
        #[cfg(feature = "failpoints")]
        if fail::eval("pkcs11.lose_session", |_| ()).is_some() {
            eprintln!(
                "fault point pkcs11.lose_session: finalizing the PKCS#11 library under the open session"
            );
            if let Ok(ctx) = Pkcs11::new(&self.settings.module) {
                let _ = ctx.finalize();
            }
        }
    }

    /// Runs `f` on the open session, opening it first if needed; when the token says the
    /// session (or the library) is gone, opens a new one and runs `f` once more.
    fn with_session<T>(
        &self,
        op: &'static str,
        f: impl Fn(&Session, ObjectHandle) -> Result<T, CkError>,
    ) -> Result<T, TokenError> {
        let mut guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..2 {
            if guard.is_none() {
                let again = Self::open(&self.settings)?;
                if again.id != self.id {
                    return Err(TokenError::Operation {
                        token: self.token_label.clone(),
                        op,
                        error: format!(
                            "key '{}' is not the key this process opened (its id changed from {} to {})",
                            self.settings.key_label, self.id, again.id
                        ),
                    });
                }
                let reopened = again.open.into_inner().unwrap_or_else(|p| p.into_inner());
                *guard = reopened;
                tracing::info!(token = %self.token_label, "PKCS#11 session reopened");
            }
            let open = guard.as_ref().expect("opened above");
            TOKEN_CALLS.fetch_add(1, Ordering::Relaxed);
            match f(&open.session, open.key) {
                Ok(v) => return Ok(v),
                Err(e) if attempt == 0 && TokenError::session_lost(&e) => {
                    tracing::warn!(token = %self.token_label, error = %e, op, "PKCS#11 session lost; reopening it");
                    // The old session may be invalid: forget it without closing it twice.
                    if let Some(old) = guard.take() {
                        std::mem::forget(old.session);
                    }
                }
                Err(e) => return Err(op_error(&self.token_label, op, e)),
            }
        }
        unreachable!("the second attempt returns")
    }

    /// Encrypts a data key's 32 bytes with the token key, AES-256-GCM, a fresh random
    /// 12-byte nonce and `aad`: `nonce || ciphertext || tag`, as a local master key does.
    /// A token that chooses the IV itself (AWS CloudHSM writes its own into the
    /// parameters' IV buffer) has its IV stored: the one the token used.
    pub fn wrap(&self, aad: &[u8], key: &[u8]) -> Result<Vec<u8>, TokenError> {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let (nonce, sealed) =
            self.with_session("wrap a data key (C_Encrypt, CKM_AES_GCM)", |s, k| {
                let mut iv = nonce;
                let params = GcmParams::new(&mut iv, aad, 128.into())?;
                let sealed = s.encrypt(&Mechanism::AesGcm(params), k, key)?;
                Ok((iv, sealed))
            })?;
        let mut out = Vec::with_capacity(12 + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The 32 bytes of a data key wrapped by [`TokenKey::wrap`]; `None` when the token's
    /// authentication of the wrapped bytes (or their length) fails.
    pub fn unwrap(
        &self,
        aad: &[u8],
        wrapped: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, TokenError> {
        if wrapped.len() != 12 + 32 + 16 {
            return Ok(None);
        }
        let nonce: [u8; 12] = wrapped[..12].try_into().expect("12 bytes");
        let result = self.with_session("unwrap a data key (C_Decrypt, CKM_AES_GCM)", |s, k| {
            let mut iv = nonce;
            let params = GcmParams::new(&mut iv, aad, 128.into())?;
            match s.decrypt(&Mechanism::AesGcm(params), k, &wrapped[12..]) {
                Ok(plain) => Ok(Some(Zeroizing::new(plain))),
                Err(CkError::Pkcs11(
                    RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
                    _,
                )) => Ok(None),
                // SoftHSM2 (2.6) reports a GCM tag that does not verify as
                // CKR_GENERAL_ERROR; others say CKR_FUNCTION_FAILED. Either is an
                // authentication failure when the session still answers afterwards.
                Err(e @ CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _)) => {
                    match s.get_session_info() {
                        Ok(_) => Ok(None),
                        Err(_) => Err(e),
                    }
                }
                Err(e) => Err(e),
            }
        })?;
        Ok(result.filter(|k| k.len() == 32))
    }

    /// CMAC of [`MESSAGE_KEY_LABEL`] under the token key: the input keying material of the
    /// batch orders' message key.
    pub fn message_key_material(&self) -> Result<Zeroizing<Vec<u8>>, TokenError> {
        self.with_session("derive the message key (C_Sign, CKM_AES_CMAC)", |s, k| {
            s.sign(&Mechanism::AesCMac, k, MESSAGE_KEY_LABEL)
                .map(Zeroizing::new)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_of_a_token_key_depends_on_the_serial_and_cka_id_only() {
        let a = token_key_id("1234abcd", &[1, 2, 3]);
        assert_eq!(a, token_key_id("1234abcd  ", &[1, 2, 3]));
        assert_ne!(a, token_key_id("1234abce", &[1, 2, 3]));
        assert_ne!(a, token_key_id("1234abcd", &[1, 2, 4]));
    }

    /// FORMAT.md's example of a token key's id, computed here and found there.
    #[test]
    fn format_md_gives_the_id_of_a_token_key() {
        let cka_id: Vec<u8> = (0..16u8).map(|i| i * 0x11).collect();
        let id = token_key_id("8b3c1a2f40d7e915", &cka_id);
        assert_eq!(id.to_string(), "9c6d83c8-0f9e-dc1c-1590-b3d53fd2b085");
        let format = include_str!("../../../FORMAT.md");
        assert!(format.contains("For serial `8b3c1a2f40d7e915` and `CKA_ID` `00112233445566778899aabbccddeeff` the id is\n`9c6d83c8-0f9e-dc1c-1590-b3d53fd2b085`"));
    }
}
