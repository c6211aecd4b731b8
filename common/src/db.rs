//! The connection pool and the migrations. rekey's own tables live in schema `rekey`
//! (`migrations/rekey`), the demo application's in schema `demo` (`migrations/demo`), each
//! with its own migration history, so that rekey never touches an application's schema
//! unless asked to seed the demo.

use std::str::FromStr;

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
    // TLS settings in the URL (see `tls`): `sslrootcert` is ours, and rustls verifies the
    // host name in every mode, so `verify-ca` and `verify-full` mean `require` here.
    let (url, ca_file) = crate::tls::take_param(url, "sslrootcert");
    let url = url
        .replace("sslmode=verify-full", "sslmode=require")
        .replace("sslmode=verify-ca", "sslmode=require");
    let mut cfg = tokio_postgres::Config::from_str(&url).map_err(|_| {
        anyhow::anyhow!("REKEY_DATABASE_URL is not a valid PostgreSQL connection URL")
    })?;
    if cfg.get_application_name().is_none() {
        cfg.application_name("rekey");
    }
    cfg.connect_timeout(std::time::Duration::from_secs(10));
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let mgr = if cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        let ca = ca_file
            .as_deref()
            .map(|f| crate::tls::read_ca("REKEY_DATABASE_URL (sslrootcert)", f))
            .transpose()?;
        Manager::from_config(
            cfg,
            crate::tls::postgres_connector(ca.as_deref())?,
            manager_config,
        )
    } else {
        anyhow::ensure!(
            ca_file.is_none(),
            "REKEY_DATABASE_URL names sslrootcert without sslmode=require"
        );
        Manager::from_config(cfg, NoTls, manager_config)
    };
    Pool::builder(mgr)
        .max_size(max_size)
        .build()
        .context("build the PostgreSQL connection pool")
}

/// Takes a connection, naming the setting and the address (never the password) on failure.
pub async fn check_connection(pool: &Pool, settings: &Settings) -> anyhow::Result<String> {
    let client = pool
        .get()
        .await
        .map_err(|e| connection_error(&e, settings))?;
    let row = client.query_one("SHOW server_version", &[]).await?;
    Ok(row.get(0))
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
