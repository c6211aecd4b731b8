//! TLS for the PostgreSQL and RabbitMQ connections, with rustls (ring). Configured in the
//! URLs, the way libpq and RabbitMQ's URI spec do it:
//!
//! - PostgreSQL: `?sslmode=require` turns TLS on (`verify-ca` and `verify-full` are taken as
//!   `require`: rustls always verifies the certificate chain and the host name, so
//!   `require` is as strict here); `&sslrootcert=/path/ca.pem` names the CA certificates to
//!   trust instead of the system's. Without `sslmode=require`, no TLS (as before).
//! - RabbitMQ: an `amqps://` URL uses TLS; `?cacertfile=/path/ca.pem` names the CA to trust
//!   besides the system's.
//!
//! The parameters are removed from the URL before it reaches the drivers. Errors name the
//! setting and the file, never the URL (it may hold a password).

use std::sync::Arc;

use anyhow::Context;

/// Removes `key=value` from a URL's query string; returns the URL without it and the
/// percent-decoded value.
pub fn take_param(url: &str, key: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((k, v)) if k == key => {
                value = Some(percent_decode(v));
                false
            }
            _ => !pair.is_empty(),
        })
        .collect();
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (url, value)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The PEM text of a CA file named by `setting`'s URL parameter.
pub fn read_ca(setting: &str, path: &str) -> anyhow::Result<String> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("{setting}: cannot read the CA certificate file {path}"))?;
    anyhow::ensure!(
        pem.contains("-----BEGIN CERTIFICATE-----"),
        "{setting}: {path} holds no PEM certificate"
    );
    Ok(pem)
}

/// A tokio-postgres TLS connector trusting the certificates in `ca_pem`, or the system's
/// roots without it.
pub fn postgres_connector(
    ca_pem: Option<&str>,
) -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots
                    .add(
                        cert.context(
                            "REKEY_DATABASE_URL: sslrootcert holds a malformed certificate",
                        )?,
                    )
                    .context("REKEY_DATABASE_URL: sslrootcert holds an unusable certificate")?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_taken_out_of_the_url() {
        let (u, v) = take_param(
            "postgres://u@h/db?sslmode=require&sslrootcert=%2Frun%2Fca.pem&application_name=x",
            "sslrootcert",
        );
        assert_eq!(u, "postgres://u@h/db?sslmode=require&application_name=x");
        assert_eq!(v.as_deref(), Some("/run/ca.pem"));
        let (u, v) = take_param("amqps://u:p@h/%2f?cacertfile=/ca.pem", "cacertfile");
        assert_eq!(
            (u.as_str(), v.as_deref()),
            ("amqps://u:p@h/%2f", Some("/ca.pem"))
        );
        let (u, v) = take_param("amqp://h/%2f", "cacertfile");
        assert_eq!((u.as_str(), v), ("amqp://h/%2f", None));
    }
}
