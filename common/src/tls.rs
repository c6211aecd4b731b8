//! TLS for the PostgreSQL and RabbitMQ connections, with rustls (ring). Configured in the
//! URLs, the way libpq and RabbitMQ's URI spec do it:
//!
//! - PostgreSQL: libpq's `sslmode`, meaning what libpq says: `disable`; `prefer` (the
//!   default: TLS when the server offers it, the certificate not verified); `require` (TLS
//!   or nothing; verified against `sslrootcert` when one is named); `verify-ca` (the chain
//!   verified, not the host name); `verify-full` (chain and host name).
//!   `&sslrootcert=/path/ca.pem` names the CA certificates to trust instead of the system's.
//!   [`parse_postgres_url`] is the one parser, for validation and connection alike.
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

/// libpq's `sslmode` values, meaning what libpq says they mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgSslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it (libpq's default), the certificate not verified.
    Prefer,
    /// TLS or no connection; the certificate verified against `sslrootcert` when one is
    /// named (as libpq does when a root CA file exists), else not verified.
    Require,
    /// TLS, the certificate chain verified (`sslrootcert`, else the system's roots), not
    /// the host name.
    VerifyCa,
    /// TLS, the chain and the host name verified.
    VerifyFull,
}

impl PgSslMode {
    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            "allow" => anyhow::bail!(
                "REKEY_DATABASE_URL: sslmode=allow (cleartext first) is not supported; use prefer, require, verify-ca or verify-full"
            ),
            other => anyhow::bail!(
                "REKEY_DATABASE_URL: sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            ),
        })
    }

    /// Whether a connection in this mode is always encrypted.
    pub fn always_tls(self) -> bool {
        matches!(self, Self::Require | Self::VerifyCa | Self::VerifyFull)
    }
}

/// A PostgreSQL URL taken apart once, for validation and connection alike: the driver's
/// configuration (without our TLS parameters) and what TLS to use.
#[derive(Debug, Clone)]
pub struct PgUrl {
    pub config: tokio_postgres::Config,
    pub mode: PgSslMode,
    /// The CA file `sslrootcert` names.
    pub root_cert: Option<String>,
}

/// Parses a PostgreSQL URL with libpq's `sslmode` (default `prefer`) and `sslrootcert`.
/// Errors name the setting, never the URL (it may hold a password).
pub fn parse_postgres_url(url: &str) -> anyhow::Result<PgUrl> {
    let (url, root_cert) = take_param(url, "sslrootcert");
    let (url, mode) = take_param(&url, "sslmode");
    let mode = PgSslMode::parse(mode.as_deref().unwrap_or("prefer"))?;
    let mut config =
        <tokio_postgres::Config as std::str::FromStr>::from_str(&url).map_err(|_| {
            anyhow::anyhow!("REKEY_DATABASE_URL is not a valid PostgreSQL connection URL")
        })?;
    anyhow::ensure!(
        !(mode == PgSslMode::Disable && root_cert.is_some()),
        "REKEY_DATABASE_URL names sslrootcert with sslmode=disable"
    );
    config.ssl_mode(match mode {
        PgSslMode::Disable => tokio_postgres::config::SslMode::Disable,
        PgSslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    Ok(PgUrl {
        config,
        mode,
        root_cert,
    })
}

/// The TLS connector for a parsed URL's mode (`None` for `disable`).
pub fn connector_for(
    url: &PgUrl,
) -> anyhow::Result<Option<tokio_postgres_rustls::MakeRustlsConnect>> {
    let ca = url
        .root_cert
        .as_deref()
        .map(|f| read_ca("REKEY_DATABASE_URL (sslrootcert)", f))
        .transpose()?;
    let verify = match (url.mode, ca.is_some()) {
        (PgSslMode::Disable, _) => return Ok(None),
        (PgSslMode::Prefer, _) | (PgSslMode::Require, false) => Verify::Nothing,
        (PgSslMode::Require, true) | (PgSslMode::VerifyCa, _) => Verify::Chain,
        (PgSslMode::VerifyFull, _) => Verify::ChainAndName,
    };
    Ok(Some(postgres_connector_with(ca.as_deref(), verify)?))
}

/// How much of the server's certificate is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    ChainAndName,
}

/// A verifier for libpq's weaker modes: `Nothing` accepts any certificate (the handshake's
/// signatures are still checked); `Chain` verifies the chain but not the host name.
#[derive(Debug)]
struct LibpqVerifier {
    /// The chain's verifier (`None` when nothing is verified).
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    verify: Verify,
}

impl rustls::client::danger::ServerCertVerifier for LibpqVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(inner) = self
            .inner
            .as_ref()
            .filter(|_| self.verify != Verify::Nothing)
        else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if self.verify == Verify::Chain => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A tokio-postgres TLS connector trusting the certificates in `ca_pem`, or the system's
/// roots without it; the chain and the host name verified.
pub fn postgres_connector(
    ca_pem: Option<&str>,
) -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
    postgres_connector_with(ca_pem, Verify::ChainAndName)
}

fn postgres_connector_with(
    ca_pem: Option<&str>,
    verify: Verify,
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
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let config = if verify == Verify::ChainAndName {
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        let inner = match verify {
            Verify::Nothing => None,
            _ => Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .context(
                    "REKEY_DATABASE_URL: no usable CA certificate to verify the server with",
                )?,
            ),
        };
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LibpqVerifier {
                inner,
                provider,
                verify,
            }))
            .with_no_client_auth()
    };
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
