//! The processes the load tools start and stop: rekey's own binaries (found beside this
//! program), a fleet of `rekey-worker` processes that replaces its dead, signals, and a
//! private RabbitMQ node that can be stopped and started without touching the machine's
//! shared broker.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secrecy::SecretString;
use tokio::process::{Child, Command};

/// `rekey` and `rekey-worker` in `bin_dir`, or an error saying how to get them.
pub fn binaries(bin_dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let rekey = bin_dir.join("rekey");
    let worker = bin_dir.join("rekey-worker");
    for b in [&rekey, &worker] {
        anyhow::ensure!(
            b.exists(),
            "{} not found: build it (`cargo build --release`) or pass --bin-dir",
            b.display()
        );
    }
    Ok((rekey, worker))
}

/// `rekey rotate` arguments for an unattended run: `stages`, no observation, each stage
/// promoted by itself, `propagation` of key propagation, no preflight.
pub fn unattended_rotate(stages: &[i32], propagation: &str) -> Vec<String> {
    let stages = stages
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    [
        "rotate",
        "--stages",
        &stages,
        "--observe",
        "0",
        "--auto-advance",
        "--key-propagation",
        propagation,
        "--skip-preflight",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The directory of this executable: where `cargo build` puts the other binaries.
pub fn own_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Deletes the queues of `prefix` from the settings' broker (best effort: the load tools
/// clean up after themselves, and a broker that is gone has nothing to clean).
pub async fn delete_queues(settings: &rekey_common::Settings, prefix: &str) {
    let topo = rekey_common::broker::Topology::new(prefix);
    if let Ok(conn) = rekey_common::broker::connect(&settings.amqp_url, "rekey-loadtest").await
        && let Ok(ch) = conn.create_channel().await
    {
        let _ = rekey_common::broker::delete(&ch, &topo).await;
        rekey_common::broker::close(&conn, "cleaned up").await;
    }
}

/// Sends `signal` (e.g. "TERM", "KILL") to a process, or with `group` to its process group.
pub fn signal(pid: u32, signal: &str, group: bool) -> bool {
    let target = if group {
        format!("-{pid}")
    } else {
        pid.to_string()
    };
    std::process::Command::new("kill")
        .args([&format!("-{signal}"), "--", &target])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether a process ended by SIGKILL.
pub fn killed(status: &ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(9)
}

/// How the fleet's workers are started.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub bin: PathBuf,
    /// Environment of every worker (settings, `RUST_LOG`).
    pub env: Vec<(String, String)>,
    /// Arguments besides `--worker-id`.
    pub args: Vec<String>,
    /// Where each worker's stderr goes (`<id>.log`); `None`: discarded.
    pub log_dir: Option<PathBuf>,
    /// Worker ids are this followed by a number (`w1`, `w2`, …).
    pub id_prefix: String,
}

/// A worker the fleet started.
#[derive(Debug)]
pub struct Member {
    pub id: String,
    pub child: Child,
    /// `FAILPOINTS` it was started with, if any.
    pub failpoints: Option<String>,
}

/// A worker that ended, and how.
#[derive(Debug, Clone)]
pub struct Death {
    pub id: String,
    pub status: ExitStatus,
    pub failpoints: Option<String>,
}

/// Worker processes kept at a fixed number: a dead one is replaced on the next
/// [`Fleet::replace_dead`].
#[derive(Debug)]
pub struct Fleet {
    spec: FleetSpec,
    pub members: Vec<Member>,
    pub deaths: Vec<Death>,
    /// `FAILPOINTS` for the next workers started, one per start; when empty, none.
    pub failpoints: VecDeque<String>,
    started: usize,
}

impl Fleet {
    /// Starts `n` workers.
    pub fn start(spec: FleetSpec, n: usize, failpoints: VecDeque<String>) -> anyhow::Result<Self> {
        let mut fleet = Self {
            spec,
            members: Vec::new(),
            deaths: Vec::new(),
            failpoints,
            started: 0,
        };
        for _ in 0..n {
            let m = fleet.spawn()?;
            fleet.members.push(m);
        }
        Ok(fleet)
    }

    fn spawn(&mut self) -> anyhow::Result<Member> {
        self.started += 1;
        let id = format!("{}{}", self.spec.id_prefix, self.started);
        let mut cmd = Command::new(&self.spec.bin);
        cmd.arg("--worker-id")
            .arg(&id)
            .args(&self.spec.args)
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        cmd.stderr(match &self.spec.log_dir {
            Some(dir) => Stdio::from(
                std::fs::File::create(dir.join(format!("{id}.log")))
                    .with_context(|| format!("create a log file in {}", dir.display()))?,
            ),
            None => Stdio::null(),
        });
        let failpoints = self.failpoints.pop_front();
        if let Some(f) = &failpoints {
            cmd.env("FAILPOINTS", f);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", self.spec.bin.display()))?;
        Ok(Member {
            id,
            child,
            failpoints,
        })
    }

    /// Records the workers that ended and starts one for each. Returns those that ended.
    pub fn replace_dead(&mut self) -> anyhow::Result<Vec<Death>> {
        let mut ended = Vec::new();
        for i in 0..self.members.len() {
            if let Some(status) = self.members[i].child.try_wait()? {
                let fresh = self.spawn()?;
                let old = std::mem::replace(&mut self.members[i], fresh);
                ended.push(Death {
                    id: old.id,
                    status,
                    failpoints: old.failpoints,
                });
            }
        }
        self.deaths.extend(ended.iter().cloned());
        Ok(ended)
    }

    /// SIGKILLs the `i`-th worker (it is replaced on the next `replace_dead`).
    pub fn kill(&mut self, i: usize) -> Option<String> {
        let m = self.members.get_mut(i)?;
        m.child.start_kill().ok()?;
        Some(m.id.clone())
    }

    /// SIGTERMs every worker and waits up to `within` for each to drain and exit; those
    /// still running then are killed. Returns how each ended.
    pub async fn stop(mut self, within: Duration) -> Vec<Death> {
        for m in &self.members {
            if let Some(pid) = m.child.id() {
                signal(pid, "TERM", false);
            }
        }
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        for mut m in self.members.drain(..) {
            let left = deadline.saturating_duration_since(Instant::now());
            let status = match tokio::time::timeout(left, m.child.wait()).await {
                Ok(Ok(s)) => Some(s),
                _ => {
                    let _ = m.child.start_kill();
                    m.child.wait().await.ok()
                }
            };
            if let Some(status) = status {
                out.push(Death {
                    id: m.id,
                    status,
                    failpoints: m.failpoints,
                });
            }
        }
        out
    }
}

/// A RabbitMQ node of its own (own port, own data directory under the temp directory),
/// started from the installed RabbitMQ as a plain process, so that it can be stopped and
/// started again without disturbing the machine's shared broker or anyone using it.
/// Dropping it kills the node and removes its directory.
#[derive(Debug)]
pub struct PrivateBroker {
    dir: PathBuf,
    node: String,
    port: u16,
    tls_port: Option<u16>,
    dist_port: u16,
    child: Option<Child>,
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(l.local_addr()?.port())
}

/// RabbitMQ's server script: `$REKEY_RABBITMQ_SERVER`, else Debian's place for it.
fn server_script() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("REKEY_RABBITMQ_SERVER") {
        return Ok(p.into());
    }
    let p = PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if p.exists() {
        return Ok(p);
    }
    bail!(
        "RabbitMQ's server script is not at {}: install rabbitmq-server or set REKEY_RABBITMQ_SERVER",
        p.display()
    )
}

/// A server certificate and key (PEM) for a private server's TLS listener.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

impl PrivateBroker {
    /// Starts a node and waits until it accepts AMQP connections.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None).await
    }

    /// As [`start`](Self::start), with an `amqps` listener too (see [`tls_url`](Self::tls_url)).
    pub async fn start_with(tls: Option<&ServerTls>) -> anyhow::Result<Self> {
        let tag = format!("{}-{}", std::process::id(), rand::random::<u32>());
        let dir = std::env::temp_dir().join(format!("rekey-rabbit-{tag}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let port = free_port()?;
        let mut b = Self {
            node: format!("rekey-{tag}@localhost"),
            tls_port: None,
            port,
            dist_port: free_port()?,
            dir,
            child: None,
        };
        let mut conf = format!("listeners.tcp.local = 127.0.0.1:{port}\n");
        if let Some(t) = tls {
            let tls_port = free_port()?;
            b.tls_port = Some(tls_port);
            std::fs::write(b.dir.join("server.pem"), &t.cert_pem)?;
            std::fs::write(b.dir.join("server.key"), &t.key_pem)?;
            conf.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{tls_port}\nssl_options.certfile = {}\nssl_options.keyfile = {}\nssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n",
                b.dir.join("server.pem").display(),
                b.dir.join("server.key").display()
            ));
        }
        std::fs::write(b.dir.join("rabbitmq.conf"), conf)?;
        std::fs::write(b.dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(b.dir.join("rabbitmq-env.conf"), "")?;
        b.boot().await?;
        Ok(b)
    }

    /// The node's AMQP address (guest/guest, from 127.0.0.1 only).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The node's `amqps` address (host name `localhost`), when started with TLS.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port
            .map(|p| format!("amqps://guest:guest@localhost:{p}/%2f"))
    }

    async fn boot(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))?;
        let d = |f: &str| self.dir.join(f);
        let mut cmd = Command::new(server_script()?);
        cmd.env("HOME", &self.dir)
            .env("RABBITMQ_CONF_ENV_FILE", d("rabbitmq-env.conf"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            // Its own group, so that stopping it stops the Erlang VM under the script.
            .process_group(0);
        let mut child = cmd.spawn().context("start a private RabbitMQ node")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let url = SecretString::from(self.url());
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the private RabbitMQ node exited while starting ({status}); see {}",
                    self.dir.join("server.log").display()
                );
            }
            if let Ok(conn) = rekey_common::broker::connect(&url, "rekey-broker-check").await {
                rekey_common::broker::close(&conn, "ready").await;
                break;
            }
            if Instant::now() > deadline {
                let _ = child.id().map(|p| signal(p, "KILL", true));
                bail!(
                    "the private RabbitMQ node did not accept connections within 120 s; see {}",
                    self.dir.join("server.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.child = Some(child);
        Ok(())
    }

    /// Stops the node the way an operator's `systemctl stop` does (SIGTERM, orderly
    /// shutdown; durable queues and persistent messages stay on disk).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            signal(pid, "TERM", true);
        }
        if tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .is_err()
        {
            if let Some(pid) = child.id() {
                signal(pid, "KILL", true);
            }
            child.wait().await?;
        }
        Ok(())
    }

    /// Stops the node, leaves it down for `down`, starts it again.
    pub async fn restart(&mut self, down: Duration) -> anyhow::Result<()> {
        self.stop().await?;
        tokio::time::sleep(down).await;
        self.boot().await
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            signal(pid, "KILL", true);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL server of its own (a temporary data directory, a free port, trust
/// authentication), started from the installed server binaries as a plain process, with
/// TLS on when given a certificate. Dropping it stops the server and removes the directory.
#[derive(Debug)]
pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    pub async fn start(tls: Option<&ServerTls>) -> anyhow::Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL server binaries not found under /usr/lib/postgresql")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .context("no initdb under /usr/lib/postgresql/*/bin")?;
        let dir = std::env::temp_dir().join(format!(
            "rekey-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir)?;
        let pg = Self {
            port: free_port()?,
            dir,
            bin,
        };
        let data = pg.dir.join("data");
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        if root {
            // The server refuses to run as root.
            run_std(
                std::process::Command::new("chown")
                    .arg("postgres")
                    .arg(&pg.dir),
            )?;
        }
        run_std(
            pg.as_owner(root, "initdb")
                .args(["-U", "postgres", "--auth=trust", "-D"])
                .arg(&data),
        )?;
        let mut conf = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n",
            pg.port,
            pg.dir.display()
        );
        if let Some(t) = tls {
            std::fs::write(pg.dir.join("server.crt"), &t.cert_pem)?;
            std::fs::write(pg.dir.join("server.key"), &t.key_pem)?;
            if root {
                run_std(
                    std::process::Command::new("chown")
                        .arg("postgres")
                        .arg(pg.dir.join("server.crt"))
                        .arg(pg.dir.join("server.key")),
                )?;
            }
            run_std(
                std::process::Command::new("chmod")
                    .arg("600")
                    .arg(pg.dir.join("server.key")),
            )?;
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                pg.dir.join("server.crt").display(),
                pg.dir.join("server.key").display()
            ));
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?;
        std::io::Write::write_all(&mut f, conf.as_bytes())?;
        run_std(
            pg.as_owner(root, "pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(pg.dir.join("server.log"))
                .args(["-w", "start"]),
        )?;
        Ok(pg)
    }

    fn as_owner(&self, root: bool, tool: &str) -> std::process::Command {
        let path = self.bin.join(tool);
        if root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            std::process::Command::new(path)
        }
    }

    /// A URL for the `postgres` database as user `postgres`, host name `localhost`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@localhost:{}/postgres", self.port)
    }
}

fn run_std(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let _ = self
            .as_owner(root, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
