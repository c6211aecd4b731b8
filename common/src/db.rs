//! The connection pool and the migrations. rekey's own tables live in schema `rekey`
//! (`migrations/rekey`), the demo application's in schema `demo` (`migrations/demo`), each
//! with its own migration history, so that rekey never touches an application's schema
//! unless asked to seed the demo.

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use secrecy::ExposeSecret;
use tokio_postgres::NoTls;

use crate::config::Settings;

mod embedded_rekey {
    refinery::embed_migrations!("../migrations/rekey");
}
mod embedded_demo {
    refinery::embed_migrations!("../migrations/demo");
}

/// Builds a pool for the configured database. Connections are made lazily; call
/// [`check_connection`] to fail early with a clear message.
pub fn pool(settings: &Settings, max_size: usize) -> anyhow::Result<Pool> {
    pool_for_url(settings.database_url.expose_secret(), max_size)
}

pub fn pool_for_url(url: &str, max_size: usize) -> anyhow::Result<Pool> {
    // The one parse of the URL's TLS settings (`tls::parse_postgres_url`), shared with the
    // settings' validation.
    let parsed = crate::tls::parse_postgres_url(url)?;
    let mut cfg = parsed.config.clone();
    if cfg.get_application_name().is_none() {
        cfg.application_name("rekey");
    }
    cfg.connect_timeout(std::time::Duration::from_secs(10));
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let mgr = match crate::tls::connector_for(&parsed)? {
        Some(tls) => Manager::from_config(cfg, tls, manager_config),
        None => Manager::from_config(cfg, NoTls, manager_config),
    };
    Pool::builder(mgr)
        .max_size(max_size)
        .build()
        .context("build the PostgreSQL connection pool")
}

/// Takes a connection, naming the setting and the address (never the password) on failure;
/// the server's version and whether the connection is encrypted (`15.4 over TLSv1.3`).
pub async fn check_connection(pool: &Pool, settings: &Settings) -> anyhow::Result<String> {
    let client = pool
        .get()
        .await
        .map_err(|e| connection_error(&e, settings))?;
    // The version, and whether this connection is encrypted, as the server sees it.
    let row = client
        .query_one(
            "SELECT current_setting('server_version'),
                    (SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl)",
            &[],
        )
        .await?;
    let (version, tls): (String, Option<String>) = (row.get(0), row.get(1));
    Ok(match tls {
        Some(t) => format!("{version} over {t}"),
        None => format!("{version}, not encrypted"),
    })
}

/// Why a connection failed, said once: a server that answered and refused (a database
/// that does not exist, a wrong password) is told apart from one that cannot be reached.
fn connection_error(e: &deadpool_postgres::PoolError, settings: &Settings) -> anyhow::Error {
    let at = format!(
        "PostgreSQL at {} ({})",
        settings.database_display(),
        settings.database_url_from
    );
    if let deadpool_postgres::PoolError::Backend(pg) = e {
        if let Some(db) = pg.as_db_error() {
            return anyhow::anyhow!(
                "{at} refused the connection: {}: {}",
                db.severity(),
                db.message()
            );
        }
        // The innermost cause (an I/O error, a TLS failure) is what an operator acts on.
        let mut cause: &dyn std::error::Error = pg;
        while let Some(next) = cause.source() {
            cause = next;
        }
        return anyhow::anyhow!("cannot reach {at}: {cause}");
    }
    anyhow::anyhow!("cannot reach {at}: {e}")
}

/// Applies rekey's migrations; idempotent, and safe when several processes start at once.
pub async fn migrate(pool: &Pool) -> anyhow::Result<Vec<String>> {
    run_migrations(pool, "rekey", embedded_rekey::migrations::runner()).await
}

/// Applies the demo application's schema (used by the load test and `rekey demo`).
pub async fn migrate_demo(pool: &Pool) -> anyhow::Result<Vec<String>> {
    run_migrations(pool, "demo", embedded_demo::migrations::runner()).await
}

async fn run_migrations(
    pool: &Pool,
    schema: &str,
    mut runner: refinery::Runner,
) -> anyhow::Result<Vec<String>> {
    let mut client = pool
        .get()
        .await
        .context("connect to PostgreSQL to migrate")?;
    // One migrator at a time: a second process waits, then finds nothing left to do.
    client
        .execute("SELECT pg_advisory_lock(hashtext('rekey migrate'))", &[])
        .await?;
    let result = async {
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await?;
        let report = runner
            .set_migration_table_name(format!("{schema}.schema_history"))
            .run_async(&mut **client)
            .await
            .with_context(|| format!("apply the {schema} migrations"))?;
        anyhow::Ok(
            report
                .applied_migrations()
                .iter()
                .map(|m| m.to_string())
                .collect::<Vec<_>>(),
        )
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock(hashtext('rekey migrate'))", &[])
        .await?;
    result
}
