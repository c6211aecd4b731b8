//! What every command that touches the database starts from: the settings, a pool, and
//! where the process's run events and metrics go.

use std::sync::Arc;

use anyhow::Context as _;

use crate::events::Events;
use deadpool_postgres::Pool;
use rekey_common::Settings;
use rekey_common::keys::master::MasterKey;
use rekey_common::metrics::Metrics;
use rekey_common::notify::Notifier;

/// What every command that touches the database starts from.
#[derive(Debug)]
pub struct Context {
    pub settings: Settings,
    pub pool: Pool,
    /// The process's instruments (served by `--metrics-addr` while a run is driven).
    pub metrics: Arc<Metrics>,
    /// Run events: the log, `metrics`, and the webhook of the settings.
    pub events: Events,
}

impl Context {
    /// Loads settings and connects, failing with a message that names the setting.
    pub async fn connect(config: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let settings = Settings::load(config)?;
        Self::with_settings(settings).await
    }

    pub async fn with_settings(settings: Settings) -> anyhow::Result<Self> {
        let pool = rekey_common::db::pool(&settings, 6)?;
        rekey_common::db::check_connection(&pool, &settings).await?;
        let metrics = Metrics::new("rekey");
        let notifier = Notifier::new(settings.webhook_url.as_ref())?;
        let events = Events::new(notifier, Some(metrics.clone()));
        Ok(Self {
            settings,
            pool,
            metrics,
            events,
        })
    }

    /// Loads the master key from the configured provider.
    pub fn master_key(&self) -> anyhow::Result<MasterKey> {
        self.settings.load_master_key()
    }

    /// Loads the master key and checks that it opens the key store (every data key and
    /// field key unwraps), before a command changes anything: a wrong master key is
    /// refused here, not by every batch later.
    pub async fn checked_master_key(&self) -> anyhow::Result<MasterKey> {
        let master = self.master_key()?;
        rekey_common::keys::store::load_ring(&**self.pool.get().await?, &master)
            .await
            .context("the master key does not open the key store; nothing was changed")?;
        Ok(master)
    }
}
