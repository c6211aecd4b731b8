//! The worker's key ring: loaded from the key store at start and reloaded when a batch
//! needs a key the ring does not have (a key generated after the worker started). When
//! the key store is wrapped by another master key (after `rekey keys rotate-master`), the
//! worker reads its master key again from its settings (a rotated key file) and uses it if
//! it opens the store; otherwise every batch fails with the mismatch, which the worker's
//! presence reports to `rekey status`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;

use deadpool_postgres::Pool;
use rekey_common::keys::master::MasterKey;
use rekey_common::keys::ring::KeyRing;
use rekey_common::keys::store;
use rekey_common::messages::{BatchMessage, MessageError, MessageKey};

/// Reads the master key again from where the settings say it is.
pub type MasterSource = Box<dyn Fn() -> anyhow::Result<MasterKey> + Send + Sync>;

/// How often at most a batch order whose tag does not verify makes the worker read its
/// master key again (a rotated key file): forged orders cannot make it read in a loop.
const SOURCE_READ_EVERY: Duration = Duration::from_secs(10);

pub struct RingHandle {
    master: RwLock<Arc<MasterKey>>,
    /// Derived from `master`; verifies the batch orders' tags.
    message_key: RwLock<Arc<MessageKey>>,
    source: Option<MasterSource>,
    last_source_read: Mutex<Option<Instant>>,
    /// The master key that wraps the key store, as last learned.
    store_master: Mutex<Option<Uuid>>,
    current: RwLock<Arc<KeyRing>>,
    /// Key ids that were still unknown after a reload: values under them are corrupt or
    /// foreign, and must not make every batch reload the ring.
    known_missing: Mutex<HashSet<Uuid>>,
}

impl std::fmt::Debug for RingHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingHandle")
            .field("master_key_id", &self.master_id())
            .finish_non_exhaustive()
    }
}

impl RingHandle {
    pub async fn load(pool: &Pool, master: MasterKey) -> anyhow::Result<Self> {
        let client = pool.get().await?;
        let ring = store::load_ring(&**client, &master).await?;
        Ok(Self {
            message_key: RwLock::new(Arc::new(MessageKey::derive(&master))),
            master: RwLock::new(Arc::new(master)),
            source: None,
            last_source_read: Mutex::new(None),
            store_master: Mutex::new(None),
            current: RwLock::new(Arc::new(ring)),
            known_missing: Mutex::new(HashSet::new()),
        })
    }

    /// Where to read the master key again when the key store no longer opens with it.
    pub fn with_master_source(mut self, source: MasterSource) -> Self {
        self.source = Some(source);
        self
    }

    /// The fingerprint of the master key the worker holds now.
    pub fn master_id(&self) -> Uuid {
        self.master.read().expect("master lock").id()
    }

    pub fn get(&self) -> Arc<KeyRing> {
        self.current.read().expect("ring lock").clone()
    }

    /// Whether any of `ids` might appear after a reload (not already known to be missing).
    pub fn worth_reloading(&self, ids: &HashSet<Uuid>) -> bool {
        let missing = self.known_missing.lock().expect("missing lock");
        ids.iter().any(|id| !missing.contains(id))
    }

    /// Remembers ids that a fresh ring still does not hold.
    pub fn note_missing(&self, ring: &KeyRing, ids: &HashSet<Uuid>) {
        let mut missing = self.known_missing.lock().expect("missing lock");
        missing.extend(ids.iter().filter(|id| !ring.contains(id)));
    }

    /// Reloads from the key store. Encryption counts not yet flushed stay with the old
    /// ring; callers flush before they reload. A wrong master key makes the worker read
    /// its master key again, once per failure; a new one that opens the store is kept.
    pub async fn reload(&self, pool: &Pool) -> anyhow::Result<Arc<KeyRing>> {
        let client = pool.get().await?;
        let master = self.master.read().expect("master lock").clone();
        let ring = match store::load_ring(&**client, &master).await {
            Ok(ring) => ring,
            Err(wrong @ store::Error::WrongMasterKey { .. }) => {
                let Some(fresh) = self.source.as_ref().and_then(|s| s().ok()) else {
                    return Err(wrong.into());
                };
                if fresh.id() == master.id() {
                    return Err(wrong.into());
                }
                let ring = store::load_ring(&**client, &fresh).await?;
                tracing::warn!(
                    old = %master.id(),
                    new = %fresh.id(),
                    "the key store is wrapped by another master key; reloaded the master key from the settings"
                );
                *self.message_key.write().expect("message key lock") =
                    Arc::new(MessageKey::derive(&fresh));
                *self.master.write().expect("master lock") = Arc::new(fresh);
                ring
            }
            Err(e) => return Err(e.into()),
        };
        let ring = Arc::new(ring);
        *self.current.write().expect("ring lock") = ring.clone();
        tracing::info!(n_keys = ring.len(), "key ring reloaded");
        Ok(ring)
    }

    /// Whether `msg`'s tag verifies under the master key held now (no reload).
    pub fn verifies(&self, msg: &BatchMessage) -> bool {
        let key = self.message_key.read().expect("message key lock").clone();
        key.verify(msg).is_ok()
    }

    /// Checks a batch order's tag before anything else is done with it.
    ///
    /// An order tagged under this worker's master key must verify (else `BadTag`). One
    /// tagged under another key may come from a driver that runs after `rotate-master`
    /// while this worker still holds the old key: the worker reads its master key again
    /// (a replaced key file; at most every [`SOURCE_READ_EVERY`]) and takes it up if the
    /// tag verifies under it and the key store opens with it. If the order names the key
    /// store's master key and this worker cannot take it up, the fault is the worker's:
    /// `OtherMasterKey` (the caller hands the order back for a worker with the right key).
    /// Any other key: `BadTag`.
    pub async fn authenticate(&self, pool: &Pool, msg: &BatchMessage) -> Result<(), MessageError> {
        let ours = self.master_id();
        let theirs = msg.master_key();
        if theirs == ours {
            let key = self.message_key.read().expect("message key lock").clone();
            return key.verify(msg);
        }
        if self.may_look_again() {
            self.look_again(pool, msg).await;
            if self.master_id() == theirs {
                let key = self.message_key.read().expect("message key lock").clone();
                return key.verify(msg);
            }
        }
        let store = *self.store_master.lock().expect("store master lock");
        if store == Some(theirs) {
            return Err(MessageError::OtherMasterKey {
                theirs,
                ours: self.master_id(),
            });
        }
        Err(MessageError::BadTag)
    }

    fn may_look_again(&self) -> bool {
        let mut last = self.last_source_read.lock().expect("source read lock");
        if last.is_some_and(|t| t.elapsed() < SOURCE_READ_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// Reads the master key again if the order's tag verifies under the key the settings
    /// name now, and learns which master key wraps the key store.
    async fn look_again(&self, pool: &Pool, msg: &BatchMessage) {
        let fresh_verifies = self
            .source
            .as_ref()
            .and_then(|s| s().ok())
            .is_some_and(|fresh| {
                fresh.id() == msg.master_key() && MessageKey::derive(&fresh).verify(msg).is_ok()
            });
        // The reload switches to the settings' key only if the store is wrapped by it;
        // otherwise it says which key wraps the store.
        match self.reload(pool).await {
            Ok(_) => *self.store_master.lock().expect("store master lock") = Some(self.master_id()),
            Err(e) => {
                if let Some(store::Error::WrongMasterKey { expected, .. }) = e.downcast_ref() {
                    *self.store_master.lock().expect("store master lock") = Some(*expected);
                }
                if fresh_verifies {
                    tracing::warn!(error = %format!("{e:#}"), "a batch order is tagged under the master key the settings name now, and the key store does not open with it");
                }
            }
        }
    }
}
