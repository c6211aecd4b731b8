//! The deployment files checked with what runs here (no container engine): the compose file
//! against the Compose Specification's JSON schema, and every command, flag, port,
//! environment variable and file path in it against what the binaries and the repository
//! actually have.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::binaries::bin;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// `${VAR:-default}` replaced by its default, as compose does with no variable set.
fn with_defaults(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').expect("an unclosed ${") + i;
        let inner = &rest[i + 2..end];
        let (_, default) = inner
            .split_once(":-")
            .unwrap_or_else(|| panic!("${{{inner}}} has no default"));
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn compose() -> Value {
    let mut yaml: serde_norway::Value =
        serde_norway::from_str(&with_defaults(&read("docker-compose.yml"))).unwrap();
    // `<<:` merge keys, as docker compose applies them.
    yaml.apply_merge().unwrap();
    serde_json::to_value(yaml).unwrap()
}

/// `binary args… --help` succeeds: clap checks the subcommands and flags (`--help` after the
/// arguments), and nothing runs.
fn assert_accepted(binary: &str, args: &[String], context: &str) {
    let out = Command::new(bin(binary))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{context}: `{binary} {}` is refused: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn the_compose_file_follows_the_compose_specification() {
    // docs/compose-spec.schema.json: the Compose Specification schema as shipped in
    // docker-compose 1.29.2 (compose/config/compose_spec.json).
    let schema: Value = serde_json::from_str(&read("docs/compose-spec.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let doc = compose();
    let errors: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    // And it would catch a mistake.
    let mut bad = doc.clone();
    bad["services"]["worker"]["stop_grace_period"] = serde_json::json!(["2m"]);
    assert!(!validator.is_valid(&bad));
}

#[test]
fn every_service_command_port_variable_and_path_matches_what_rekey_accepts() {
    let doc = compose();
    let services = doc["services"].as_object().unwrap();
    for want in [
        "postgres",
        "rabbitmq",
        "migrate",
        "worker",
        "coordinator",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(want), "no {want} service");
    }
    // Scalable workers: nothing that pins one container (name, host port).
    let worker = &doc["services"]["worker"];
    assert!(worker.get("container_name").is_none() && worker.get("ports").is_none());

    // rekey's own services: the binary and its arguments are accepted (`--help` after the
    // arguments makes clap check them without running anything).
    let mut metrics_ports = BTreeSet::new();
    for (name, svc) in services {
        if svc["image"] != "rekey:latest" {
            continue;
        }
        let entry = strings(&svc["entrypoint"]);
        let binary = entry.first().cloned().unwrap_or_else(|| "rekey".into());
        let args = strings(&svc["command"]);
        assert_accepted(&binary, &args, name);
        if let Some(i) = args.iter().position(|a| a == "--metrics-addr") {
            metrics_ports.insert(args[i + 1].rsplit(':').next().unwrap().to_owned());
        }
        // Every variable is one rekey reads.
        let sources = [
            read("common/src/config.rs"),
            read("worker/src/main.rs"),
            read("coordinator/src/cli.rs"),
        ]
        .concat();
        for (var, _) in svc["environment"].as_object().unwrap() {
            if var.starts_with("REKEY_") {
                assert!(
                    sources.contains(&format!("\"{var}\"")),
                    "{name}: {var} is read nowhere"
                );
            }
        }
        // Secrets are mounted where the variables say.
        let secrets = strings(&svc["secrets"]);
        for (var, value) in svc["environment"].as_object().unwrap() {
            if let Some(secret) = value.as_str().and_then(|v| v.strip_prefix("/run/secrets/")) {
                assert!(
                    secrets.iter().any(|s| s == secret),
                    "{name}: {var} names secret {secret}, which is not mounted"
                );
            }
        }
    }
    // The workers' metrics port is the one Prometheus scrapes; the coordinator's too.
    assert_eq!(metrics_ports, BTreeSet::from(["9464".to_owned()]));
    let prometheus = read("prometheus/prometheus.yml");
    assert!(prometheus.contains("port: 9464") && prometheus.contains("coordinator:9465"));
    assert!(read("docker-compose.yml").contains("rotate --metrics-addr 0.0.0.0:9465"));
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("EXPOSE 9464 9465"));
    // The image runs as a non-root user and holds the three binaries.
    assert!(dockerfile.contains("USER 10001"));
    for b in ["rekey", "rekey-worker", "rekey-loadtest"] {
        assert!(
            dockerfile.contains(&format!("--bin {b} "))
                || dockerfile.contains(&format!("--bin {b}\n"))
        );
    }

    // Files: every secret is one the secrets script writes; every mounted repository path
    // exists; Prometheus' rule file and Grafana's dashboard are where they are mounted from.
    let script = read("scripts/compose-secrets.sh");
    for (name, s) in doc["secrets"].as_object().unwrap() {
        let file = s["file"].as_str().unwrap();
        let base = file
            .strip_prefix("./secrets/")
            .expect("secrets live in ./secrets");
        assert!(
            script.contains(&format!("write {base} "))
                || script.contains(&format!("\"$dir/{base}\"")),
            "{name}: the script never writes {file}"
        );
    }
    for (name, svc) in services {
        for v in strings(&svc["volumes"]) {
            if let Some(path) = v.strip_prefix("./") {
                let path = path.split(':').next().unwrap();
                assert!(
                    repo(path).exists(),
                    "{name} mounts ./{path}, which does not exist"
                );
            }
        }
    }
    assert!(repo("prometheus/alerts.yml").exists() && prometheus.contains("- alerts.yml"));
    assert!(repo("grafana/dashboards/encryption-health.json").exists());
    assert!(
        read("grafana/provisioning/dashboards/rekey.yml").contains("/var/lib/grafana/dashboards")
    );
    assert!(
        read("docker-compose.yml").contains("./grafana/dashboards:/var/lib/grafana/dashboards:ro")
    );
}

#[test]
fn the_compose_topology_as_plain_processes_rotates_and_verifies() {
    let bin_dir = bin("rekey").parent().unwrap().to_path_buf();
    let out = Command::new("timeout")
        .arg("600")
        .arg("bash")
        .arg(repo("scripts/topology.sh"))
        .env("BIN_DIR", &bin_dir)
        .env("ROWS", "3000")
        .env_remove("REKEY_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 workers"), "{stdout}");
    assert!(stdout.contains("the audit log is intact"), "{stdout}");
    assert!(
        stdout.contains("the topology rotated and verified 3000 records"),
        "{stdout}"
    );
    // .ci/run installs Prometheus (for promtool), so the scrape is checked there too.
    if Command::new("prometheus").arg("--version").output().is_ok() {
        assert!(
            stdout.contains("Prometheus scraped sum(rows_rotated_total) = 5653"),
            "{stdout}"
        );
    }
}

/// The two commands README.md opens with: the demo's and the tests'.
fn readme_first_commands() -> Vec<String> {
    let readme = read("README.md");
    let block = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("README.md opens with a sh block");
    block
        .lines()
        .map(|l| l.split(" #").next().unwrap().trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn readme_opens_with_the_demo_and_test_commands_and_ci_runs_the_second_exactly() {
    let head: String = read("README.md")
        .lines()
        .take(8)
        .collect::<Vec<_>>()
        .join("\n");
    let cmds = readme_first_commands();
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    assert!(head.contains(&cmds[0]) && head.contains(&cmds[1]), "{head}");
    assert!(cmds[0].starts_with("scripts/setup.sh && ") && cmds[0].ends_with("rekey demo"));
    assert_eq!(
        cmds[1],
        "scripts/setup.sh && cargo test --workspace --locked --all-features"
    );
    let ci = read(".ci/run");
    let ci_cmds: Vec<&str> = ci
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains("cargo"))
        .collect();
    assert_eq!(ci_cmds, [cmds[1].as_str()], ".ci/run: {ci}");
    // CONTRIBUTING's tests section shows the same command.
    assert!(read("CONTRIBUTING.md").contains(&format!("```sh\n{}\n```", cmds[1])));
}

/// The suite runs after `scripts/setup.sh`, so the services are up and a second run of the
/// script must find nothing to do, change nothing, and say so.
#[test]
fn setup_script_run_again_changes_nothing_and_says_so() {
    if std::env::var_os("REKEY_TEST_DATABASE_URL").is_some() {
        eprintln!("skipped: REKEY_TEST_DATABASE_URL points the tests at a server of their own");
        return;
    }
    let clusters = || {
        Command::new("pg_lsclusters")
            .arg("-h")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let before = clusters();
    let out = Command::new("bash")
        .arg(repo("scripts/setup.sh"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("already installed")
            && stdout.contains("PostgreSQL already answers on 127.0.0.1:5432")
            && stdout.contains("RabbitMQ already answers on 127.0.0.1:5672"),
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.contains("nothing changed"), "{stdout}");
    assert_eq!(clusters(), before, "the script changed the clusters");
}

/// README, CONTRIBUTING and every page under docs/.
fn markdown_files() -> Vec<String> {
    let mut files = vec!["README.md".to_owned(), "CONTRIBUTING.md".to_owned()];
    for e in std::fs::read_dir(repo("docs")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            files.push(format!("docs/{name}"));
        }
    }
    files
}

/// The sh blocks of a Markdown file, each as its logical lines (continuations joined,
/// comments dropped).
fn sh_lines(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    for block in markdown.split("```sh\n").skip(1) {
        let body = block.split("```").next().unwrap_or_default();
        let mut line = String::new();
        for raw in body.lines() {
            let code = raw.split(" #").next().unwrap_or_default().trim_end();
            if let Some(head) = code.strip_suffix('\\') {
                line.push_str(head);
                line.push(' ');
                continue;
            }
            line.push_str(code);
            if !line.trim().is_empty() {
                out.push(line.trim().to_owned());
            }
            line.clear();
        }
    }
    out
}

/// Every `rekey`, `rekey-worker` and `rekey-loadtest` command in the sh blocks of README and
/// the docs (and `docker compose run --rm coordinator …`, which is `rekey …`), as binary and
/// arguments, placeholders filled in.
fn documented_commands() -> Vec<(String, String, Vec<String>)> {
    let files = markdown_files();
    let mut out = Vec::new();
    for file in files {
        for line in sh_lines(&read(&file)) {
            for part in line.split(['|', ';']).flat_map(|p| p.split("&&")) {
                let part = part.trim().trim_end_matches('&').trim();
                let part = part
                    .strip_prefix("docker compose run --rm coordinator ")
                    .map(|rest| format!("rekey {rest}"))
                    .unwrap_or_else(|| part.to_owned());
                let words: Vec<&str> = part.split_whitespace().collect();
                let Some(first) = words.first() else { continue };
                let binary = first.rsplit('/').next().unwrap();
                if !["rekey", "rekey-worker", "rekey-loadtest"].contains(&binary) {
                    continue;
                }
                let args = words[1..]
                    .iter()
                    .map(|w| match *w {
                        "<RUN>" | "RUN" | "N" => "1".to_owned(),
                        "<ID>" | "ID" | "<TARGET>" => {
                            "00000000-0000-0000-0000-000000000000".to_owned()
                        }
                        w => w.to_owned(),
                    })
                    .collect();
                out.push((file.clone(), binary.to_owned(), args));
            }
        }
    }
    out
}

#[test]
fn every_command_in_readme_and_docs_exists_with_the_flags_shown() {
    let cmds = documented_commands();
    assert!(cmds.len() > 30, "found only {} commands", cmds.len());
    for (file, binary, args) in cmds {
        assert_accepted(&binary, &args, &file);
    }
}

#[test]
fn readme_is_short_and_links_every_docs_page_and_every_link_resolves() {
    let readme = read("README.md");
    assert!(
        readme.len() <= 8 * 1024,
        "README.md is {} bytes",
        readme.len()
    );
    for e in std::fs::read_dir(repo("docs")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            assert!(
                readme.contains(&format!("](docs/{name})")),
                "README does not link docs/{name}"
            );
        }
    }
    // Every relative link of README, CONTRIBUTING and the docs names a file that exists.
    let files = markdown_files();
    for file in files {
        let text = read(&file);
        let dir = Path::new(&file).parent().unwrap().to_path_buf();
        for link in text.split("](").skip(1) {
            let target = link.split(')').next().unwrap();
            if target.starts_with("http") || target.starts_with('#') {
                continue;
            }
            let path = target.split('#').next().unwrap();
            assert!(
                repo(dir.join(path).to_str().unwrap()).exists(),
                "{file}: link to {target}, which does not exist"
            );
        }
    }
}

/// The operator binary links no load-test tooling: its normal dependencies hold neither
/// `rekey-loadtest` nor plotters (the demo's data comes from `rekey-demo`).
#[test]
fn the_operator_binary_does_not_depend_on_the_load_test_tooling() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "rekey-coordinator",
            "-e",
            "normal",
            "--offline",
            "--locked",
        ])
        .current_dir(repo(""))
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tree.contains("rekey-demo"), "{tree}");
    for banned in ["plotters", "rekey-loadtest"] {
        assert!(
            !tree.contains(banned),
            "rekey-coordinator depends on {banned}:\n{tree}"
        );
    }
}

/// A master key written where README's walk-through writes it is never committed by
/// accident: git ignores it.
#[test]
fn key_files_in_the_repository_are_ignored_by_git() {
    for path in ["master.key", "new.key", "secrets/master_key"] {
        let out = Command::new("git")
            .args(["check-ignore", "-q", path])
            .current_dir(repo(""))
            .status();
        match out {
            Ok(s) => assert!(s.success(), "git does not ignore {path}"),
            Err(e) => eprintln!("skipped: no git ({e})"),
        }
    }
}

/// The RabbitMQ users scripts/compose-secrets.sh defines for the compose file have the
/// permissions `rekey broker-users` gives (one truth: `Topology::*_permissions`), and their
/// hashes are of the passwords the services read.
#[test]
fn the_compose_broker_users_have_the_permissions_rekey_gives() {
    let dir = std::env::temp_dir().join(format!("rekey-secrets-{}", uuid::Uuid::new_v4().simple()));
    let out = Command::new(repo("scripts/compose-secrets.sh"))
        .env("SECRETS_DIR", &dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let defs: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("rabbitmq-definitions.json")).unwrap(),
    )
    .unwrap();
    let coordinator = dir
        .join("rabbitmq_coordinator_password")
        .display()
        .to_string();
    let worker = dir.join("rabbitmq_worker_password").display().to_string();
    let rekey = Command::new(bin("rekey"))
        .args([
            "broker-users",
            "--coordinator-password-file",
            &coordinator,
            "--worker-password-file",
            &worker,
        ])
        .env("REKEY_QUEUE_PREFIX", "rekey")
        .env_remove("REKEY_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(
        rekey.status.success(),
        "{}",
        String::from_utf8_lossy(&rekey.stderr)
    );
    let ours: Value = serde_json::from_slice(&rekey.stdout).unwrap();
    for p in ours["permissions"].as_array().unwrap() {
        let theirs = defs["permissions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["user"] == p["user"])
            .unwrap_or_else(|| panic!("compose defines no user {}", p["user"]));
        for k in ["vhost", "configure", "write", "read"] {
            assert_eq!(theirs[k], p[k], "{}: {k}", p["user"]);
        }
    }
    // Each hash is the salted SHA-256 of the password file the service reads.
    use base64::Engine;
    use sha2::Digest;
    for (user, file) in [
        ("rekey-coordinator", &coordinator),
        ("rekey-worker", &worker),
    ] {
        let u = defs["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == user)
            .unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(u["password_hash"].as_str().unwrap())
            .unwrap();
        let password = std::fs::read_to_string(file).unwrap();
        let digest = sha2::Sha256::new()
            .chain_update(&raw[..4])
            .chain_update(password.trim_end().as_bytes())
            .finalize();
        assert_eq!(&raw[4..], digest.as_slice(), "{user}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
