//! Running the `rekey` binary as an operator would, with a controlled environment.

use std::process::{Command, Output};

/// Output of one `rekey` invocation.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub raw: Vec<u8>,
}

/// Runs `rekey args…` with only the given `REKEY_*` variables (plus PATH and RUST_LOG).
/// Unless `env` names another `REKEY_CONFIG`, the settings name the demo's tables.
pub fn rekey(env: &[(&str, &str)], args: &[&str]) -> Run {
    let demo = rekey_common::testing::demo_config().display().to_string();
    let mut all: Vec<(&str, &str)> = vec![("REKEY_CONFIG", demo.as_str())];
    all.extend_from_slice(env);
    rekey_in(&std::env::temp_dir(), &all, args)
}

/// [`rekey`] in the working directory `dir` (where it looks for `rekey.toml`).
pub fn rekey_in(dir: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rekey"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "debug")
        .current_dir(dir)
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run rekey");
    let mut raw = stdout.clone();
    raw.extend_from_slice(&stderr);
    Run {
        ok: status.success(),
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        raw,
    }
}
