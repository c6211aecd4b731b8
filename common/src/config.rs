//! Settings: a `rekey.toml` (targets, key policy, addresses) overridden by `REKEY_*`
//! environment variables. Addresses default to a local Postgres and RabbitMQ; the tables
//! to rotate (`[[targets]]`, see [`crate::target`]) have no default. Secrets (URLs that may
//! hold passwords, the master key) are kept in `SecretString` and never printed.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, bail};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

pub use crate::keys::KeyPolicy;
use crate::keys::master::{EnvMasterKey, FileMasterKey, MasterKeyError, MasterKeyProvider};
use crate::target::{Target, demo_targets, targets_toml};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The file form of the settings; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    database_url: Option<String>,
    amqp_url: Option<String>,
    amqp_urls: Option<Vec<String>>,
    master_key_file: Option<PathBuf>,
    master_key_provider: Option<String>,
    pkcs11: Option<FilePkcs11>,
    queue_prefix: Option<String>,
    actor: Option<String>,
    reports_dir: Option<PathBuf>,
    probe_query: Option<String>,
    slo_prometheus_url: Option<String>,
    slo_query: Option<String>,
    slo_unit: Option<String>,
    backup_check: Option<String>,
    webhook_url: Option<String>,
    allow_insecure_key_file: Option<bool>,
    require_tls: Option<bool>,
    dead_letter_max_length: Option<i64>,
    #[serde(default)]
    keys: Option<KeyPolicy>,
    #[serde(default)]
    targets: Vec<Target>,
}

/// The `[pkcs11]` table of `rekey.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePkcs11 {
    module: Option<PathBuf>,
    token_label: Option<String>,
    slot: Option<u64>,
    pin_file: Option<PathBuf>,
    key_label: Option<String>,
}

/// The key label a PKCS#11 master key has unless `REKEY_PKCS11_KEY_LABEL` says otherwise.
pub const DEFAULT_PKCS11_KEY_LABEL: &str = "rekey-master";

/// The PKCS#11 settings, from the environment over the `[pkcs11]` table; `None` when
/// neither names a module.
fn pkcs11_settings(
    env: &HashMap<String, String>,
    file: Option<FilePkcs11>,
) -> anyhow::Result<Option<crate::keys::pkcs11::TokenSettings>> {
    use crate::keys::pkcs11::{TokenSelector, TokenSettings};
    let file = file.unwrap_or_default();
    let var = |k: &str| env.get(k).filter(|v| !v.trim().is_empty()).cloned();
    let module = var("REKEY_PKCS11_MODULE")
        .map(PathBuf::from)
        .or(file.module);
    let others = [
        "REKEY_PKCS11_TOKEN_LABEL",
        "REKEY_PKCS11_SLOT",
        "REKEY_PKCS11_PIN_FILE",
        "REKEY_PKCS11_KEY_LABEL",
    ];
    let Some(module) = module else {
        if let Some(set) = others.iter().find(|k| var(k).is_some()) {
            bail!(
                "{set} is set but REKEY_PKCS11_MODULE is not: name the token's PKCS#11 library (e.g. /usr/lib/softhsm/libsofthsm2.so)"
            );
        }
        return Ok(None);
    };
    let label = var("REKEY_PKCS11_TOKEN_LABEL").or(file.token_label);
    let slot = match var("REKEY_PKCS11_SLOT") {
        Some(v) => Some(
            v.trim()
                .parse::<u64>()
                .context("REKEY_PKCS11_SLOT must be a slot number")?,
        ),
        None => file.slot,
    };
    let token = match (label, slot) {
        (Some(l), None) => TokenSelector::Label(l),
        (None, Some(n)) => TokenSelector::Slot(n),
        (Some(_), Some(_)) => bail!(
            "REKEY_PKCS11_TOKEN_LABEL and REKEY_PKCS11_SLOT are both set: name the token one way"
        ),
        (None, None) => bail!(
            "REKEY_PKCS11_MODULE is set but no token is named: set REKEY_PKCS11_TOKEN_LABEL (or REKEY_PKCS11_SLOT, or token_label in [pkcs11])"
        ),
    };
    let pin_file = var("REKEY_PKCS11_PIN_FILE")
        .map(PathBuf::from)
        .or(file.pin_file)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "REKEY_PKCS11_MODULE is set but REKEY_PKCS11_PIN_FILE is not: the token's user PIN is read from a file (never from the command line or the environment)"
            )
        })?;
    let key_label = var("REKEY_PKCS11_KEY_LABEL")
        .or(file.key_label)
        .unwrap_or_else(|| DEFAULT_PKCS11_KEY_LABEL.to_owned());
    Ok(Some(TokenSettings {
        module,
        token,
        pin_file,
        key_label,
    }))
}

/// The application's latency as its own Prometheus knows it: a PromQL expression that
/// returns one series, the application's p99 (e.g. a `histogram_quantile` over its request
/// histogram), in `unit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SloSource {
    /// Prometheus's base URL (`http://prometheus:9090`); its HTTP API is queried.
    pub prometheus_url: String,
    pub query: String,
    /// What one unit of the query's value is in milliseconds (1000 for seconds).
    pub unit_ms: f64,
}

impl SloSource {
    /// From the URL, query and unit (`s` or `ms`, default `s`), as configured: both or
    /// neither of URL and query; an http(s) URL without credentials (it is kept in the
    /// run's settings and shown by `rekey status`).
    pub fn from_parts(
        url: Option<String>,
        query: Option<String>,
        unit: Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        let url = url.filter(|u| !u.trim().is_empty());
        let query = query.filter(|q| !q.trim().is_empty());
        let (url, query) = match (url, query) {
            (None, None) => return Ok(None),
            (Some(_), None) => {
                bail!(
                    "the SLO's Prometheus URL is set but no query (--slo-query, REKEY_SLO_QUERY, slo_query)"
                )
            }
            (None, Some(_)) => bail!(
                "the SLO's query is set but no Prometheus URL (--slo-prometheus-url, REKEY_SLO_PROMETHEUS_URL, slo_prometheus_url)"
            ),
            (Some(u), Some(q)) => (u.trim().trim_end_matches('/').to_owned(), q),
        };
        let Some(rest) = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
        else {
            bail!(
                "the SLO's Prometheus URL must start with http:// or https:// (--slo-prometheus-url)"
            );
        };
        if rest
            .split('/')
            .next()
            .is_some_and(|host| host.contains('@'))
        {
            bail!(
                "the SLO's Prometheus URL must not hold credentials (--slo-prometheus-url): it is kept in the run's settings; put an authenticating proxy on loopback in front of Prometheus"
            );
        }
        let unit_ms = match unit.as_deref().map(str::trim).unwrap_or("s") {
            "s" | "seconds" => 1000.0,
            "ms" | "milliseconds" => 1.0,
            other => bail!(
                "the SLO's unit must be s or ms (--slo-unit, REKEY_SLO_UNIT, slo_unit), not {other:?}"
            ),
        };
        Ok(Some(Self {
            prometheus_url: url,
            query,
            unit_ms,
        }))
    }
}

/// Where the master key comes from, as configured.
#[derive(Clone)]
pub enum MasterKeySource {
    None,
    Env(SecretString),
    File(PathBuf),
    /// The key labelled `key_label` in the PKCS#11 token of [`Settings::pkcs11`].
    Pkcs11,
}

impl fmt::Debug for MasterKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MasterKeySource::None => f.write_str("None"),
            MasterKeySource::Env(_) => f.write_str("Env(REKEY_MASTER_KEY)"),
            MasterKeySource::File(p) => write!(f, "File({})", p.display()),
            MasterKeySource::Pkcs11 => f.write_str("Pkcs11"),
        }
    }
}

/// A secret from a file named by `setting` (a mounted Docker or Kubernetes secret): its
/// first line. Errors name the setting and the path, never the contents.
pub fn read_secret_file(setting: &str, path: &str) -> anyhow::Result<SecretString> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{setting}: cannot read {path}: {}", e.kind()))?,
    );
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        bail!("{setting}: {path} is empty");
    }
    Ok(SecretString::from(line.to_owned()))
}

/// `url` with its password replaced by `password` (percent-encoded). The URL must name a
/// user (`scheme://user@host/…`).
fn with_password(url: &str, password: &SecretString) -> anyhow::Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| anyhow::anyhow!("the URL has no scheme"))?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, host) = authority
        .rsplit_once('@')
        .ok_or_else(|| anyhow::anyhow!("the URL names no user (user@host)"))?;
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    let mut encoded = zeroize::Zeroizing::new(String::new());
    for b in password.expose_secret().bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(format!(
        "{scheme}://{user}:{}@{host}{tail}",
        encoded.as_str()
    ))
}

/// Everything a rekey process is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// PostgreSQL URL; may hold a password, so it is secret.
    pub database_url: SecretString,
    /// The first AMQP URL; may hold a password, so it is secret.
    pub amqp_url: SecretString,
    /// Every AMQP URL, the first one included: the nodes of a RabbitMQ cluster, tried in
    /// turn ([`crate::broker::connect_settings`]). `REKEY_AMQP_URL` holds them separated by
    /// commas; `rekey.toml` as `amqp_urls = [...]` (or one `amqp_url`).
    pub amqp_urls: Vec<SecretString>,
    /// Where `database_url` came from, as messages say it ("set by REKEY_DATABASE_URL", …).
    pub database_url_from: String,
    /// Where `amqp_url` came from, likewise.
    pub amqp_url_from: String,
    /// The configuration file read, if any.
    pub config_file: Option<PathBuf>,
    pub master_key: MasterKeySource,
    /// The PKCS#11 token, when configured (`REKEY_PKCS11_*`, `[pkcs11]`): the master key's
    /// (`MasterKeySource::Pkcs11`), or the target of `rekey keys rotate-master` /
    /// `new-master --pkcs11`.
    pub pkcs11: Option<crate::keys::pkcs11::TokenSettings>,
    /// The prefix of every queue and exchange name, so that test runs and environments
    /// sharing one broker never see each other's messages.
    pub queue_prefix: String,
    /// Who acts, for the audit log.
    pub actor: String,
    pub key_policy: KeyPolicy,
    /// Accept a master key file that group or others can read
    /// (`REKEY_ALLOW_INSECURE_KEY_FILE=1`, `allow_insecure_key_file = true`, or the
    /// binaries' `--allow-insecure-key-file`).
    pub allow_insecure_key_file: bool,
    /// Refuse a database or broker URL that may travel in cleartext (`REKEY_REQUIRE_TLS=1`,
    /// `require_tls = true`).
    pub require_tls: bool,
    /// The most messages the dead-letter queue keeps (the oldest are dropped beyond it):
    /// `REKEY_DEAD_LETTER_MAX_LENGTH`, `dead_letter_max_length`, default
    /// [`crate::broker::DEFAULT_DEAD_LETTER_MAX_LENGTH`]. Every process declaring the
    /// queues must use the same value (the broker refuses a declaration that differs).
    pub dead_letter_max_length: i64,
    pub targets: Vec<Target>,
    /// Where evidence reports are written (`exports/rotation_reports` by default).
    pub reports_dir: PathBuf,
    /// A query whose latency stands for the application's (default: point reads by id).
    pub probe_query: Option<String>,
    /// The application's own latency signal for the throttle, from its Prometheus
    /// (`REKEY_SLO_PROMETHEUS_URL` + `REKEY_SLO_QUERY`, or `slo_prometheus_url` + `slo_query`).
    pub slo: Option<SloSource>,
    /// How preflight proves a recent backup: `archiver` (pg_stat_archiver),
    /// `command:<shell command>` (exit 0 = a backup within 24 h exists), or `none`.
    pub backup_check: String,
    /// Where run events are posted (Slack-compatible JSON); its path often holds a token,
    /// so it is secret. `REKEY_WEBHOOK_URL` or `webhook_url`.
    pub webhook_url: Option<SecretString>,
}

impl Settings {
    /// Loads from the process environment and, if present, the file named by `--config`,
    /// `REKEY_CONFIG`, or `./rekey.toml`.
    pub fn load(config_file: Option<&Path>) -> anyhow::Result<Self> {
        let mut env: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("REKEY_"))
            .collect();
        let settings = Self::from_sources(config_file, &env);
        // This copy of the environment holds REKEY_MASTER_KEY (and perhaps URLs with
        // passwords): wiped before it is freed.
        for v in env.values_mut() {
            zeroize::Zeroize::zeroize(v);
        }
        settings
    }

    /// Loads from an explicit environment map (tests use this).
    pub fn from_sources(
        config_file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        let path = config_file
            .map(Path::to_path_buf)
            .or_else(|| env.get("REKEY_CONFIG").map(PathBuf::from))
            .or_else(|| {
                Path::new("rekey.toml")
                    .exists()
                    .then(|| PathBuf::from("rekey.toml"))
            });
        let file: FileSettings = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("read configuration file {}", p.display()))?;
                // The message and the position only: toml's own text quotes the line,
                // which may hold a password or a webhook token.
                toml::from_str(&text).map_err(|e: toml::de::Error| {
                    let at = e.span().map(|r| {
                        let before = &text[..r.start.min(text.len())];
                        let line = before.matches('\n').count() + 1;
                        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                        format!(" at line {line}, column {column}")
                    });
                    anyhow::anyhow!(
                        "configuration file {} is not valid: {}{}",
                        p.display(),
                        e.message(),
                        at.unwrap_or_default()
                    )
                })?
            }
            None => FileSettings::default(),
        };

        let file_name = path.as_ref().map(|p| p.display().to_string());
        let (database_url, database_url_from) = url_setting(
            env,
            "REKEY_DATABASE_URL",
            file.database_url,
            "database_url",
            file_name.as_deref(),
            DEFAULT_DATABASE_URL,
        );
        let mut database_url = database_url;
        if let Some(f) = env
            .get("REKEY_DATABASE_PASSWORD_FILE")
            .filter(|v| !v.is_empty())
        {
            database_url = with_password(
                &database_url,
                &read_secret_file("REKEY_DATABASE_PASSWORD_FILE", f)?,
            )
            .context(
                "REKEY_DATABASE_URL cannot take the password from REKEY_DATABASE_PASSWORD_FILE",
            )?;
        }
        let parsed_db = crate::tls::parse_postgres_url(&database_url)?;
        if file.amqp_url.is_some() && file.amqp_urls.is_some() {
            bail!(
                "{} sets both amqp_url and amqp_urls: keep one (amqp_urls = [\"amqp://…\", …] for several nodes)",
                file_name.as_deref().unwrap_or("rekey.toml")
            );
        }
        let (file_amqp, file_amqp_key) = match file.amqp_urls {
            Some(urls) => (Some(urls.join(",")), "amqp_urls"),
            None => (file.amqp_url, "amqp_url"),
        };
        let (amqp_setting, amqp_url_from) = url_setting(
            env,
            "REKEY_AMQP_URL",
            file_amqp,
            file_amqp_key,
            file_name.as_deref(),
            DEFAULT_AMQP_URL,
        );
        let amqp_password = match env
            .get("REKEY_AMQP_PASSWORD_FILE")
            .filter(|v| !v.is_empty())
        {
            Some(f) => Some(read_secret_file("REKEY_AMQP_PASSWORD_FILE", f)?),
            None => None,
        };
        let mut amqp_urls = Vec::new();
        for (i, one) in amqp_setting.split(',').map(str::trim).enumerate() {
            let nth = i + 1;
            if one.is_empty() {
                bail!("REKEY_AMQP_URL ({amqp_url_from}): URL {nth} of the list is empty");
            }
            if !(one.starts_with("amqp://") || one.starts_with("amqps://")) {
                bail!(
                    "REKEY_AMQP_URL ({amqp_url_from}) must start with amqp:// or amqps:// (URL {nth}, {}, does not)",
                    crate::broker::redacted(one)
                );
            }
            let url = match &amqp_password {
                Some(pw) => with_password(one, pw).with_context(|| {
                    format!(
                        "REKEY_AMQP_URL cannot take the password from REKEY_AMQP_PASSWORD_FILE (URL {nth}, {})",
                        crate::broker::redacted(one)
                    )
                })?,
                None => one.to_owned(),
            };
            amqp_urls.push(url);
        }
        let require_tls = env
            .get("REKEY_REQUIRE_TLS")
            .map(|v| matches!(v.as_str(), "1" | "true" | "yes"))
            .or(file.require_tls)
            .unwrap_or(false);
        if require_tls {
            // Refuse to start on a URL that may travel in cleartext.
            if !parsed_db.mode.always_tls() {
                bail!(
                    "REKEY_REQUIRE_TLS is set, but REKEY_DATABASE_URL ({database_url_from}) allows a cleartext connection ({:?}): use sslmode=verify-full (or verify-ca, require)",
                    parsed_db.mode
                );
            }
            if let Some(plain) = amqp_urls.iter().find(|u| !u.starts_with("amqps://")) {
                bail!(
                    "REKEY_REQUIRE_TLS is set, but REKEY_AMQP_URL ({amqp_url_from}) is not amqps:// ({})",
                    crate::broker::redacted(plain)
                );
            }
        }

        let local_key = if let Some(v) = env.get("REKEY_MASTER_KEY").filter(|v| !v.is_empty()) {
            MasterKeySource::Env(SecretString::from(v.clone()))
        } else if let Some(p) = env.get("REKEY_MASTER_KEY_FILE").filter(|v| !v.is_empty()) {
            MasterKeySource::File(PathBuf::from(p))
        } else if let Some(p) = file.master_key_file {
            MasterKeySource::File(p)
        } else {
            MasterKeySource::None
        };
        let pkcs11 = pkcs11_settings(env, file.pkcs11)?;
        let provider = env
            .get("REKEY_MASTER_KEY_PROVIDER")
            .filter(|v| !v.trim().is_empty())
            .cloned()
            .or(file.master_key_provider);
        // Which key is the master: said, or the only one configured. Both configured
        // (a move between providers with `rotate-master`) needs it said.
        let master_key = match (provider.as_deref().map(str::trim), &local_key, &pkcs11) {
            (Some("local"), MasterKeySource::None, _) => bail!(
                "REKEY_MASTER_KEY_PROVIDER is local but neither REKEY_MASTER_KEY nor REKEY_MASTER_KEY_FILE is set"
            ),
            (Some("local"), _, _) => local_key,
            (Some("pkcs11"), _, None) => bail!(
                "REKEY_MASTER_KEY_PROVIDER is pkcs11 but REKEY_PKCS11_MODULE (or [pkcs11] module) is not set"
            ),
            (Some("pkcs11"), _, Some(_)) => MasterKeySource::Pkcs11,
            (Some(other), _, _) => {
                bail!("REKEY_MASTER_KEY_PROVIDER must be local or pkcs11, not {other:?}")
            }
            (None, MasterKeySource::None, Some(_)) => MasterKeySource::Pkcs11,
            (None, _, None) => local_key,
            (None, _, Some(_)) => bail!(
                "both a local master key (REKEY_MASTER_KEY / REKEY_MASTER_KEY_FILE) and a PKCS#11 token (REKEY_PKCS11_MODULE) are configured: set REKEY_MASTER_KEY_PROVIDER to local or pkcs11 to say which is the master key now"
            ),
        };

        let mut key_policy = file.keys.unwrap_or_default();
        if let Some(v) = env.get("REKEY_FIELD_ROTATION_DAYS") {
            key_policy.field_rotation_days = v
                .parse()
                .context("REKEY_FIELD_ROTATION_DAYS must be a whole number of days")?;
        }
        if let Some(v) = env.get("REKEY_DATA_ROTATION_DAYS") {
            key_policy.data_rotation_days = v
                .parse()
                .context("REKEY_DATA_ROTATION_DAYS must be a whole number of days")?;
        }

        let queue_prefix = env
            .get("REKEY_QUEUE_PREFIX")
            .cloned()
            .or(file.queue_prefix)
            .unwrap_or_else(|| "rekey".to_owned());
        if queue_prefix.is_empty()
            || !queue_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!(
                "REKEY_QUEUE_PREFIX {queue_prefix:?} may hold only letters, digits, '-', '_' and '.'"
            );
        }
        let actor = env
            .get("REKEY_ACTOR")
            .cloned()
            .or(file.actor)
            .unwrap_or_else(default_actor);

        let dead_letter_max_length = match env.get("REKEY_DEAD_LETTER_MAX_LENGTH") {
            Some(v) => v.parse().ok().filter(|n: &i64| *n > 0).with_context(|| {
                format!("REKEY_DEAD_LETTER_MAX_LENGTH must be a positive whole number, not {v:?}")
            })?,
            None => file
                .dead_letter_max_length
                .unwrap_or(crate::broker::DEFAULT_DEAD_LETTER_MAX_LENGTH),
        };
        if dead_letter_max_length <= 0 {
            bail!("dead_letter_max_length must be a positive whole number");
        }
        let targets = file.targets;
        for t in &targets {
            t.validate().context("invalid targets in configuration")?;
        }

        let reports_dir = env
            .get("REKEY_REPORTS_DIR")
            .map(PathBuf::from)
            .or(file.reports_dir)
            .unwrap_or_else(|| PathBuf::from("exports/rotation_reports"));
        let probe_query = env.get("REKEY_PROBE_QUERY").cloned().or(file.probe_query);
        let slo = SloSource::from_parts(
            env.get("REKEY_SLO_PROMETHEUS_URL")
                .cloned()
                .or(file.slo_prometheus_url),
            env.get("REKEY_SLO_QUERY").cloned().or(file.slo_query),
            env.get("REKEY_SLO_UNIT").cloned().or(file.slo_unit),
        )?;
        let backup_check = env
            .get("REKEY_BACKUP_CHECK")
            .cloned()
            .or(file.backup_check)
            .unwrap_or_else(|| "archiver".to_owned());
        if !(backup_check == "archiver"
            || backup_check == "none"
            || backup_check.starts_with("command:"))
        {
            bail!("REKEY_BACKUP_CHECK must be archiver, none, or command:<shell command>");
        }
        let webhook_url = env
            .get("REKEY_WEBHOOK_URL")
            .cloned()
            .or(file.webhook_url)
            .filter(|u| !u.is_empty());
        if let Some(u) = &webhook_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            bail!("REKEY_WEBHOOK_URL must start with http:// or https://");
        }
        Ok(Self {
            webhook_url: webhook_url.map(SecretString::from),
            reports_dir,
            probe_query,
            slo,
            backup_check,
            database_url: SecretString::from(database_url),
            amqp_url: SecretString::from(amqp_urls[0].clone()),
            amqp_urls: amqp_urls.into_iter().map(SecretString::from).collect(),
            database_url_from,
            amqp_url_from,
            config_file: path,
            master_key,
            pkcs11,
            queue_prefix,
            actor,
            key_policy,
            allow_insecure_key_file: env
                .get("REKEY_ALLOW_INSECURE_KEY_FILE")
                .map(|v| matches!(v.as_str(), "1" | "true" | "yes"))
                .or(file.allow_insecure_key_file)
                .unwrap_or(false),
            require_tls,
            dead_letter_max_length,
            targets,
        })
    }

    /// The master key provider these settings name.
    pub fn master_key_provider(&self) -> Result<Box<dyn MasterKeyProvider>, MasterKeyError> {
        match &self.master_key {
            MasterKeySource::None => Err(MasterKeyError::Missing),
            MasterKeySource::Env(v) => {
                Ok(Box::new(EnvMasterKey::new("REKEY_MASTER_KEY", v.clone())))
            }
            MasterKeySource::File(p) => Ok(Box::new(
                FileMasterKey::new("REKEY_MASTER_KEY_FILE", p)
                    .allow_insecure(self.allow_insecure_key_file),
            )),
            MasterKeySource::Pkcs11 => Ok(Box::new(crate::keys::master::Pkcs11MasterKey {
                settings: self.pkcs11.clone().ok_or(MasterKeyError::Missing)?,
            })),
        }
    }

    /// Loads the master key these settings name: the one place every binary does it.
    /// Errors name the setting (and, for a file, its path), never the key.
    pub fn load_master_key(&self) -> anyhow::Result<crate::keys::master::MasterKey> {
        // Every refusal already names the setting (and the file): said once.
        Ok(self.master_key_provider()?.load()?)
    }

    /// The database's address without user or password, for messages.
    pub fn database_display(&self) -> String {
        redacted_pg(self.database_url.expose_secret())
    }

    /// The tables and columns to rotate, or, when the settings name none, an error saying
    /// where to name them. Called before a command changes anything.
    pub fn require_targets(&self) -> anyhow::Result<&[Target]> {
        if !self.targets.is_empty() {
            return Ok(&self.targets);
        }
        let file = match &self.config_file {
            Some(p) => format!("{} has no [[targets]]", p.display()),
            None => {
                "no rekey.toml was found (./rekey.toml, or the file --config or REKEY_CONFIG names)"
                    .to_owned()
            }
        };
        bail!(
            "no tables to rotate: {file}. Name each table and its encrypted columns in rekey.toml:\n\n\
             [[targets]]\n\
             table = \"public.users\"      # [schema.]table\n\
             id_column = \"id\"            # its bigint primary key\n\
             columns = [\"email\", \"phone\"]  # bytea columns holding rekey envelopes\n\n\
             Nothing was changed. (`rekey demo` rotates the demo schema's tables by itself.)"
        )
    }

    pub fn target(&self, table: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.table == table)
    }
}

/// A URL from the environment, else the configuration file, else rekey's default, with where
/// it came from as messages say it: "set by REKEY_AMQP_URL", "set by amqp_url in rekey.toml",
/// or "rekey's default: neither REKEY_AMQP_URL nor amqp_url in rekey.toml is set".
fn url_setting(
    env: &HashMap<String, String>,
    var: &str,
    from_file: Option<String>,
    key: &str,
    file_name: Option<&str>,
    default: &str,
) -> (String, String) {
    if let Some(v) = env.get(var).filter(|v| !v.is_empty()) {
        (v.clone(), format!("set by {var}"))
    } else if let Some(v) = from_file {
        let file = file_name.unwrap_or("rekey.toml");
        (v, format!("set by {key} in {file}"))
    } else {
        (
            default.to_owned(),
            format!("rekey's default: neither {var} nor {key} in rekey.toml is set"),
        )
    }
}

/// A `rekey.toml` in the temporary directory naming the demo schema's tables, for tools and
/// tests that hand the demo data to rekey's binaries (`--config` / `REKEY_CONFIG`). One file
/// for every process (the same content, written to a temporary name and renamed into
/// place, so a reader never sees it half written).
pub fn demo_config_file() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir();
    let p = dir.join("rekey-demo-targets.toml");
    let tmp = dir.join(format!(
        "rekey-demo-targets.toml.{}.{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&tmp, targets_toml(&demo_targets()))?;
    std::fs::rename(&tmp, &p)?;
    Ok(p)
}

/// `host:port/dbname` of a PostgreSQL URL, without credentials.
pub fn redacted_pg(url: &str) -> String {
    match tokio_postgres::Config::from_str(url) {
        Ok(c) => {
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(s) => s.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".into());
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!("{host}:{port}/{}", c.get_dbname().unwrap_or(""))
        }
        Err(_) => "<invalid URL>".to_owned(),
    }
}

fn default_actor() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!("{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn the_shipped_demo_settings_name_the_demo_targets() {
        let shipped: FileSettings =
            toml::from_str(include_str!("../../examples/rekey.demo.toml")).unwrap();
        assert_eq!(shipped.targets, demo_targets());
    }

    #[test]
    fn targets_toml_reads_back_as_the_same_targets() {
        let dir = std::env::temp_dir().join(format!("rekey-targets-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rekey.toml");
        std::fs::write(&file, targets_toml(&demo_targets())).unwrap();
        let s = Settings::from_sources(Some(&file), &env(&[])).unwrap();
        assert_eq!(s.require_targets().unwrap(), demo_targets().as_slice());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn each_url_says_where_it_came_from() {
        let dir = std::env::temp_dir().join(format!("rekey-from-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml = dir.join("rekey.toml");
        std::fs::write(&toml, "amqp_url = \"amqp://mq:5672/%2f\"\n").unwrap();
        let s = Settings::from_sources(Some(&toml), &env(&[])).unwrap();
        assert_eq!(s.amqp_url.expose_secret(), "amqp://mq:5672/%2f");
        assert_eq!(
            s.amqp_url_from,
            format!("set by amqp_url in {}", toml.display())
        );
        assert_eq!(s.database_url.expose_secret(), DEFAULT_DATABASE_URL);
        assert_eq!(
            s.database_url_from,
            "rekey's default: neither REKEY_DATABASE_URL nor database_url in rekey.toml is set"
        );
        let s = Settings::from_sources(
            Some(&toml),
            &env(&[("REKEY_AMQP_URL", "amqp://other:5672/%2f")]),
        )
        .unwrap();
        assert_eq!(s.amqp_url.expose_secret(), "amqp://other:5672/%2f");
        assert_eq!(s.amqp_url_from, "set by REKEY_AMQP_URL");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn passwords_come_from_files_percent_encoded_and_never_into_an_error() {
        let dir = std::env::temp_dir().join(format!("rekey-pw-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let (db, mq, empty) = (dir.join("db"), dir.join("mq"), dir.join("empty"));
        std::fs::write(&db, "s3cr:et/@pw\n").unwrap();
        std::fs::write(&mq, "rabbit-pw").unwrap();
        std::fs::write(&empty, "\n").unwrap();
        let s = Settings::from_sources(
            None,
            &env(&[
                (
                    "REKEY_DATABASE_URL",
                    "postgres://rekey@db:5432/app?sslmode=disable",
                ),
                ("REKEY_DATABASE_PASSWORD_FILE", db.to_str().unwrap()),
                ("REKEY_AMQP_URL", "amqp://rekey:old@mq:5672/%2f"),
                ("REKEY_AMQP_PASSWORD_FILE", mq.to_str().unwrap()),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.database_url.expose_secret(),
            "postgres://rekey:s3cr%3Aet%2F%40pw@db:5432/app?sslmode=disable"
        );
        let cfg = tokio_postgres::Config::from_str(s.database_url.expose_secret()).unwrap();
        assert_eq!(cfg.get_password(), Some(&b"s3cr:et/@pw"[..]));
        assert_eq!(
            s.amqp_url.expose_secret(),
            "amqp://rekey:rabbit-pw@mq:5672/%2f"
        );
        assert!(!format!("{s:?}").contains("rabbit-pw"));
        // Errors name the setting and the file, never a secret.
        for (var, path) in [
            ("REKEY_DATABASE_PASSWORD_FILE", empty.to_str().unwrap()),
            ("REKEY_AMQP_PASSWORD_FILE", "/nonexistent/pw"),
        ] {
            let e = Settings::from_sources(None, &env(&[(var, path)])).unwrap_err();
            let text = format!("{e:#}");
            assert!(text.contains(var) && text.contains(path), "{text}");
        }
        let e = Settings::from_sources(
            None,
            &env(&[
                ("REKEY_DATABASE_URL", "postgres://db:5432/app"),
                ("REKEY_DATABASE_PASSWORD_FILE", db.to_str().unwrap()),
            ]),
        )
        .unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("names no user") && !text.contains("s3cr"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn several_amqp_urls_are_the_nodes_of_a_cluster() {
        let dir = std::env::temp_dir().join(format!("rekey-urls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mq = dir.join("mq");
        std::fs::write(&mq, "rabbit-pw").unwrap();
        let s = Settings::from_sources(
            None,
            &env(&[
                (
                    "REKEY_AMQP_URL",
                    "amqp://w@mq1:5672/%2f, amqp://w@mq2:5672/%2f,amqp://w@mq3:5672/%2f",
                ),
                ("REKEY_AMQP_PASSWORD_FILE", mq.to_str().unwrap()),
            ]),
        )
        .unwrap();
        let urls: Vec<&str> = s.amqp_urls.iter().map(|u| u.expose_secret()).collect();
        assert_eq!(
            urls,
            [
                "amqp://w:rabbit-pw@mq1:5672/%2f",
                "amqp://w:rabbit-pw@mq2:5672/%2f",
                "amqp://w:rabbit-pw@mq3:5672/%2f"
            ]
        );
        assert_eq!(s.amqp_url.expose_secret(), urls[0]);
        // In rekey.toml, as a list.
        let toml = dir.join("rekey.toml");
        std::fs::write(
            &toml,
            "amqp_urls = [\"amqp://a@n1:5672/%2f\", \"amqp://a@n2:5672/%2f\"]\n",
        )
        .unwrap();
        let s = Settings::from_sources(Some(&toml), &env(&[])).unwrap();
        assert_eq!(s.amqp_urls.len(), 2);
        assert_eq!(
            s.amqp_url_from,
            format!("set by amqp_urls in {}", toml.display())
        );
        // Errors name the URL's place in the list, never a password.
        let e = Settings::from_sources(
            None,
            &env(&[("REKEY_AMQP_URL", "amqp://u:pw1@n1/%2f,http://u:pw2@n2/%2f")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("URL 2") && e.contains("n2/%2f"), "{e}");
        assert!(!e.contains("pw1") && !e.contains("pw2"), "{e}");
        let e = Settings::from_sources(None, &env(&[("REKEY_AMQP_URL", "amqp://n1/%2f,")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("URL 2 of the list is empty"), "{e}");
        std::fs::write(
            &toml,
            "amqp_url = \"amqp://n1/%2f\"\namqp_urls = [\"amqp://n2/%2f\"]\n",
        )
        .unwrap();
        let e = Settings::from_sources(Some(&toml), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("both amqp_url and amqp_urls"), "{e}");
        // REKEY_REQUIRE_TLS holds for every node.
        let e = Settings::from_sources(
            None,
            &env(&[
                ("REKEY_REQUIRE_TLS", "1"),
                (
                    "REKEY_DATABASE_URL",
                    "postgres://db/app?sslmode=verify-full",
                ),
                ("REKEY_AMQP_URL", "amqps://n1/%2f,amqp://n2/%2f"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not amqps://") && e.contains("n2/%2f"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn defaults_need_no_configuration() {
        let s = Settings::from_sources(None, &env(&[])).unwrap();
        assert_eq!(s.database_display(), "127.0.0.1:5432/postgres");
        // No targets unless configured: the demo's tables are never a default.
        assert!(s.targets.is_empty());
        let e = s.require_targets().unwrap_err().to_string();
        assert!(e.contains("[[targets]]") && e.contains("rekey.toml"), "{e}");
        assert!(matches!(s.master_key, MasterKeySource::None));
        assert_eq!(s.key_policy.field_rotation_days, 30);
    }

    #[test]
    fn environment_overrides_the_file() {
        let path = std::env::temp_dir().join(format!("rekey-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(
            &path,
            "database_url = \"postgres://a@db1/x\"\n[keys]\nfield_rotation_days = 7\n[[targets]]\ntable = \"app.t\"\ncolumns = [\"c\"]\n",
        )
        .unwrap();
        let s = Settings::from_sources(
            Some(&path),
            &env(&[("REKEY_DATABASE_URL", "postgres://b:pw@db2:6000/y")]),
        )
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(s.database_display(), "db2:6000/y");
        assert_eq!(s.key_policy.field_rotation_days, 7);
        assert_eq!(s.key_policy.data_rotation_days, 90);
        assert_eq!(s.targets[0].quoted_table(), "\"app\".\"t\"");
    }

    #[test]
    fn bad_identifiers_and_urls_are_refused_naming_the_setting() {
        let path = std::env::temp_dir().join(format!("rekey-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(
            &path,
            "[[targets]]\ntable = \"t; drop table x\"\ncolumns = [\"c\"]\n",
        )
        .unwrap();
        let err = format!(
            "{:#}",
            Settings::from_sources(Some(&path), &env(&[])).unwrap_err()
        );
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("not a valid"), "{err}");
        let err = Settings::from_sources(
            None,
            &env(&[("REKEY_DATABASE_URL", "post gres://x:secret@")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("REKEY_DATABASE_URL"));
        assert!(!err.to_string().contains("secret"));
    }
}
