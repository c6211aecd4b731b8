//! The worker's key ring: loaded from the key store at start and reloaded when a batch
//! needs a key the ring does not have (a key generated after the worker started).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

use uuid::Uuid;

use deadpool_postgres::Pool;
use rekey_common::keys::master::MasterKey;
use rekey_common::keys::ring::KeyRing;
use rekey_common::keys::store;

#[derive(Debug)]
pub struct RingHandle {
    master: MasterKey,
    current: RwLock<Arc<KeyRing>>,
    /// Key ids that were still unknown after a reload: values under them are corrupt or
    /// foreign, and must not make every batch reload the ring.
    known_missing: Mutex<HashSet<Uuid>>,
}

impl RingHandle {
    pub async fn load(pool: &Pool, master: MasterKey) -> anyhow::Result<Self> {
        let client = pool.get().await?;
        let ring = store::load_ring(&**client, &master).await?;
        Ok(Self {
            master,
            current: RwLock::new(Arc::new(ring)),
            known_missing: Mutex::new(HashSet::new()),
        })
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
    /// ring; callers flush before they reload.
    pub async fn reload(&self, pool: &Pool) -> anyhow::Result<Arc<KeyRing>> {
        let client = pool.get().await?;
        let ring = Arc::new(store::load_ring(&**client, &self.master).await?);
        *self.current.write().expect("ring lock") = ring.clone();
        tracing::info!(n_keys = ring.len(), "key ring reloaded");
        Ok(ring)
    }
}
