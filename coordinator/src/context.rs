//! What every command that touches the database starts from: the settings and a pool.

use deadpool_postgres::Pool;
use rekey_common::Settings;
use rekey_common::keys::master::MasterKey;

/// What every command that touches the database starts from.
#[derive(Debug)]
pub struct Context {
    pub settings: Settings,
    pub pool: Pool,
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
        Ok(Self { settings, pool })
    }

    /// Loads the master key from the configured provider.
    pub fn master_key(&self) -> anyhow::Result<MasterKey> {
        self.settings.load_master_key()
    }
}
