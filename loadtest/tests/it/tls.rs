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

    // PostgreSQL: verify-full with sslrootcert: encrypted, as the server confirms.
    let pool = rekey_common::db::pool_for_url(
        &format!("{}?sslmode=verify-full&sslrootcert={ca}", pg.url()),
        1,
    )
    .unwrap();
    assert!(encrypted(&pool).await, "the connection is encrypted");
    // verify-full without the CA: refused for the issuer, no password in the error.
    let url = format!(
        "postgres://postgres:hunter2@localhost:{}/postgres?sslmode=verify-full",
        pg.port
    );
    let pool = rekey_common::db::pool_for_url(&url, 1).unwrap();
    let err = format!("{:?}", pool.get().await.unwrap_err());
    assert!(
        err.contains("UnknownIssuer") || err.contains("certificate"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    // libpq's default, prefer: TLS when the server offers it, unverified.
    let pool = rekey_common::db::pool_for_url(&pg.url(), 1).unwrap();
    assert!(encrypted(&pool).await);
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

/// Each sslmode through the binaries, as an operator writes it in REKEY_DATABASE_URL:
/// `rekey preflight` says whether the server sees the connection encrypted, refuses a wrong
/// CA and a host name the certificate does not name where the mode verifies them, and
/// `REKEY_REQUIRE_TLS` refuses a URL that allows cleartext before anything connects.
#[tokio::test(flavor = "multi_thread")]
async fn each_sslmode_through_the_binaries_means_what_libpq_says() {
    let dir = std::env::temp_dir().join(format!("rekey-tls-{}", uuid::Uuid::new_v4().simple()));
    let (ca_file, server) = pki(&dir);
    let (other_ca, _) = pki(&dir.join("other"));
    let ca = ca_file.display().to_string();
    let other = other_ca.display().to_string();
    let pg = PrivatePostgres::start(Some(&server)).await.unwrap();
    let localhost = format!("postgres://postgres@localhost:{}/postgres", pg.port);
    let ip = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    let database_line = |url: &str, extra: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(crate::binaries::bin("rekey"));
        cmd.arg("preflight")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REKEY_DATABASE_URL", url)
            .env("REKEY_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
            .env("REKEY_BACKUP_CHECK", "none")
            .env("REKEY_CONFIG", rekey_common::testing::demo_config())
            .current_dir(std::env::temp_dir());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let line = stdout
            .lines()
            .find(|l| l.contains("] database "))
            .map(str::to_owned);
        (line, stderr)
    };
    let cases: Vec<(String, &str)> = vec![
        (localhost.clone(), "over TLS"),
        (format!("{localhost}?sslmode=prefer"), "over TLS"),
        (format!("{localhost}?sslmode=disable"), "not encrypted"),
        (format!("{ip}?sslmode=require"), "over TLS"),
        (
            format!("{ip}?sslmode=verify-ca&sslrootcert={ca}"),
            "over TLS",
        ),
        (
            format!("{localhost}?sslmode=verify-full&sslrootcert={ca}"),
            "over TLS",
        ),
        (format!("{ip}?sslmode=verify-full&sslrootcert={ca}"), "FAIL"),
        (format!("{localhost}?sslmode=verify-ca"), "FAIL"),
        (
            format!("{localhost}?sslmode=verify-ca&sslrootcert={other}"),
            "FAIL",
        ),
        (format!("{ip}?sslmode=require&sslrootcert={other}"), "FAIL"),
    ];
    for (url, want) in &cases {
        let (line, err) = database_line(url, &[]);
        let line = line.unwrap_or_else(|| panic!("no database line for {url}: {err}"));
        if *want == "FAIL" {
            assert!(line.starts_with("[FAIL]"), "{url}: {line}");
            assert!(
                line.contains("certificate")
                    || line.contains("Certificate")
                    || line.contains("Issuer")
                    || line.contains("Name"),
                "{url}: {line}"
            );
        } else {
            assert!(line.starts_with("[PASS]"), "{url}: {line}");
            assert!(line.contains(want), "{url}: {line}");
        }
    }
    // sslmode=allow is not something rustls can do: said, not ignored.
    let (_, err) = database_line(&format!("{localhost}?sslmode=allow"), &[]);
    assert!(err.contains("sslmode=allow"), "{err}");
    // REKEY_REQUIRE_TLS: a URL that allows cleartext is refused before anything connects.
    for url in [localhost.clone(), format!("{localhost}?sslmode=disable")] {
        let (line, err) = database_line(&url, &[("REKEY_REQUIRE_TLS", "1")]);
        assert!(line.is_none(), "{line:?}");
        assert!(err.contains("REKEY_REQUIRE_TLS"), "{err}");
    }
    let worker = std::process::Command::new(crate::binaries::bin("rekey-worker"))
        .env_clear()
        .env("REKEY_DATABASE_URL", &localhost)
        .env("REKEY_REQUIRE_TLS", "1")
        .output()
        .unwrap();
    assert!(!worker.status.success());
    assert!(
        String::from_utf8_lossy(&worker.stderr).contains("REKEY_REQUIRE_TLS"),
        "{}",
        String::from_utf8_lossy(&worker.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
