//! The key ring: unwrapped field keys in memory, looked up by the id an envelope names.
//! Each key keeps its AES key schedule ready (building it per value would cost more than
//! the encryption) and counts the encryptions it makes against its nonce budget.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aes_gcm::{Aes256Gcm, KeyInit};
use uuid::Uuid;

use super::KeyState;
use crate::secret::KeyMaterial;

/// Why the ring refused; `envelope::Error` carries each as its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "unknown field key {key_id}: it is not in the key ring (never loaded, retired or destroyed)"
    )]
    UnknownKey { key_id: Uuid },
    #[error(
        "field key {key_id} has reached its nonce budget of random-nonce encryptions: rotate to a new key"
    )]
    BudgetExhausted { key_id: Uuid },
}

/// One unwrapped field key. The cipher zeroizes its key schedule on drop.
pub struct FieldKey {
    id: Uuid,
    state: KeyState,
    cipher: Aes256Gcm,
    /// Encryptions recorded in the key store when the key was loaded.
    encryptions_at_load: u64,
    /// The key's budget of random-nonce encryptions (2^32 by NIST SP 800-38D).
    nonce_budget: u64,
    /// Encryptions made through this ring since load or since the last flush.
    sealed: AtomicU64,
    /// Encryptions made through this ring and already taken for the key store
    /// ([`KeyRing::take_encryption_counts`]): they still count against the budget here.
    flushed: AtomicU64,
}

impl FieldKey {
    pub fn new(
        id: Uuid,
        state: KeyState,
        material: &KeyMaterial,
        encryptions_at_load: u64,
        nonce_budget: u64,
    ) -> Self {
        let cipher = Aes256Gcm::new(material.expose().into());
        Self {
            id,
            state,
            cipher,
            encryptions_at_load,
            nonce_budget,
            sealed: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        }
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn state(&self) -> KeyState {
        self.state
    }

    pub(crate) fn cipher(&self) -> &Aes256Gcm {
        &self.cipher
    }

    /// Counts one encryption, refusing it once the nonce budget is spent: the store's count
    /// at load plus every encryption this ring made since, flushed or not. (Other
    /// processes' encryptions are the key store's to refuse: `store::add_encryptions`.)
    pub(crate) fn reserve_encryption(&self) -> Result<(), Error> {
        let before = self.sealed.fetch_add(1, Ordering::Relaxed);
        let used = self
            .encryptions_at_load
            .saturating_add(self.flushed.load(Ordering::Relaxed))
            .saturating_add(before);
        if used >= self.nonce_budget {
            self.sealed.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::BudgetExhausted { key_id: self.id });
        }
        Ok(())
    }
}

impl fmt::Debug for FieldKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FieldKey")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("material", &"[REDACTED]")
            .finish()
    }
}

/// The field keys a process can use, and which one it encrypts with.
#[derive(Debug, Default, Clone)]
pub struct KeyRing {
    keys: HashMap<Uuid, Arc<FieldKey>>,
    encrypt_key: Option<Uuid>,
}

impl KeyRing {
    pub fn insert(&mut self, key: FieldKey) {
        self.keys.insert(key.id, Arc::new(key));
    }

    pub fn get(&self, id: &Uuid) -> Option<&FieldKey> {
        self.keys.get(id).map(|k| &**k)
    }

    pub fn contains(&self, id: &Uuid) -> bool {
        self.keys.contains_key(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.keys.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Chooses the key `envelope::seal` encrypts with; it must be in the ring.
    pub fn set_encrypt_key(&mut self, id: Uuid) -> Result<(), Error> {
        if !self.keys.contains_key(&id) {
            return Err(Error::UnknownKey { key_id: id });
        }
        self.encrypt_key = Some(id);
        Ok(())
    }

    pub fn encrypt_key(&self) -> Option<&FieldKey> {
        self.encrypt_key.and_then(|id| self.get(&id))
    }

    /// The encryptions made since the last call, per key, resetting the counters; the
    /// caller adds them to the key store.
    pub fn take_encryption_counts(&self) -> Vec<(Uuid, u64)> {
        let mut out: Vec<(Uuid, u64)> = self
            .keys
            .values()
            .filter_map(|k| {
                let n = k.sealed.swap(0, Ordering::Relaxed);
                k.flushed.fetch_add(n, Ordering::Relaxed);
                (n > 0).then_some((k.id, n))
            })
            .collect();
        out.sort();
        out
    }
}
