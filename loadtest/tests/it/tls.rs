//! TLS to PostgreSQL and RabbitMQ with rustls and a configurable CA: a PostgreSQL and a
//! RabbitMQ of the test's own, each with a certificate for `localhost` issued by a CA made
//! here. With the CA the connections are encrypted (the server says so); without it they
//! are refused for the unknown issuer, with an error that names the setting and no
//! password.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rekey_loadtest::procs::{PrivateBroker, PrivatePostgres, ServerTls};
use secrecy::SecretString;

/// A CA (its PEM in a file) and a server certificate for `localhost` signed by it.
fn pki(dir: &std::path::Path) -> (std::path::PathBuf, ServerTls) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    (
        ca_file,
        ServerTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
    )
}

/// Whether the server says this connection is encrypted.
async fn encrypted(pool: &deadpool_postgres::Pool) -> bool {
    pool.get()
        .await
        .unwrap()
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_and_rabbitmq_over_tls_with_a_configured_ca() {
    let dir = std::env::temp_dir().join(format!("rekey-tls-{}", uuid::Uuid::new_v4().simple()));
    let (ca_file, server) = pki(&dir);
    let ca = ca_file.display().to_string();
    let (pg, mq) = tokio::join!(
        PrivatePostgres::start(Some(&server)),
        PrivateBroker::start_with(Some(&server))
    );
    let (pg, mq) = (pg.unwrap(), mq.unwrap());

    // PostgreSQL: sslmode=require with sslrootcert: encrypted, as the server confirms.
    let pool = rekey_common::db::pool_for_url(
        &format!("{}?sslmode=require&sslrootcert={ca}", pg.url()),
        1,
    )
    .unwrap();
    let ssl = encrypted(&pool).await;
    assert!(ssl, "the connection is encrypted");
    // verify-full is accepted (rustls verifies the host name in every mode).
    let pool = rekey_common::db::pool_for_url(
        &format!("{}?sslmode=verify-full&sslrootcert={ca}", pg.url()),
        1,
    )
    .unwrap();
    assert!(pool.get().await.is_ok());
    // Without the CA: refused for the issuer.
    let url = format!(
        "postgres://postgres:hunter2@localhost:{}/postgres?sslmode=require",
        pg.port
    );
    let pool = rekey_common::db::pool_for_url(&url, 1).unwrap();
    let err = format!("{:?}", pool.get().await.unwrap_err());
    assert!(
        err.contains("UnknownIssuer") || err.contains("certificate"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    // Without sslmode=require, no TLS, as before.
    let pool = rekey_common::db::pool_for_url(&pg.url(), 1).unwrap();
    let ssl = encrypted(&pool).await;
    assert!(!ssl);
    // A CA file that is not one is named.
    let err = rekey_common::db::pool_for_url(
        &format!("{}?sslmode=require&sslrootcert=/etc/hostname", pg.url()),
        1,
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("/etc/hostname holds no PEM certificate"),
        "{err:#}"
    );

    // RabbitMQ: amqps with cacertfile connects and can declare the topology.
    let tls_url = mq.tls_url().unwrap();
    let conn = rekey_common::broker::connect(
        &SecretString::from(format!("{tls_url}?cacertfile={ca}")),
        "tls-test",
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    rekey_common::broker::declare(&ch, &rekey_common::broker::Topology::new("tls-test"))
        .await
        .unwrap();
    rekey_common::broker::close(&conn, "done").await;
    // Without the CA: refused, the password not in the error.
    let err = rekey_common::broker::connect(&SecretString::from(tls_url.clone()), "tls-test")
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("REKEY_AMQP_URL"), "{text}");
    assert!(!text.contains("guest:guest"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
