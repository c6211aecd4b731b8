//! Least-privileged RabbitMQ users, as an operator sets them up: `rekey broker-users`
//! writes their definitions, `rabbitmqctl import_definitions` loads them, and a rotation
//! runs with the coordinator and a worker each on its own user. What each may not do is
//! shown against the broker: the worker user cannot declare or delete a queue or read the
//! reports; the coordinator user cannot touch another prefix's queues.

use std::process::{Command, Stdio};
use std::time::Duration;

use rekey_common::broker;
use secrecy::SecretString;

use crate::binaries::{Env, SpawnGuarded, quick_rotate, seeded, sigterm, wait_exit};

fn rabbitmqctl(args: &[&str]) -> (bool, String) {
    let out = Command::new("rabbitmqctl")
        .args(["-n", "rabbit@localhost"])
        .args(args)
        .output()
        .expect("rabbitmqctl (scripts/setup.sh installs RabbitMQ)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Deletes the test's users however the test ends.
struct Users(Vec<String>);

impl Drop for Users {
    fn drop(&mut self) {
        for u in &self.0 {
            let _ = rabbitmqctl(&["delete_user", u]);
        }
    }
}

fn url_for(user: &str, password: &str) -> String {
    format!("amqp://{user}:{password}@127.0.0.1:5672/%2f")
}

fn with_amqp(env: &Env, url: String) -> Env {
    let mut vars: Vec<_> = env
        .vars
        .iter()
        .filter(|(k, _)| *k != "REKEY_AMQP_URL")
        .cloned()
        .collect();
    vars.push(("REKEY_AMQP_URL", url));
    Env { vars }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_runs_with_a_coordinator_user_and_a_worker_user_of_least_permissions() {
    let (db, env, _reports) = seeded(2_000).await;
    let suffix = &db.name["rekey_test_".len().."rekey_test_".len() + 8];
    let (coord, worker) = (format!("coord-{suffix}"), format!("worker-{suffix}"));
    let _users = Users(vec![coord.clone(), worker.clone()]);
    let dir = std::env::temp_dir().join(format!("{}-users", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let (coord_pw, worker_pw) = (
        format!("c-{}", uuid::Uuid::new_v4().simple()),
        format!("w-{}", uuid::Uuid::new_v4().simple()),
    );
    std::fs::write(dir.join("coord"), &coord_pw).unwrap();
    std::fs::write(dir.join("worker"), &worker_pw).unwrap();

    let cp = dir.join("coord").display().to_string();
    let wp = dir.join("worker").display().to_string();
    let (ok, defs, err) = env.run(
        "rekey",
        &[
            "broker-users",
            "--coordinator-user",
            &coord,
            "--coordinator-password-file",
            &cp,
            "--worker-user",
            &worker,
            "--worker-password-file",
            &wp,
        ],
    );
    assert!(ok, "{defs}{err}");
    assert!(
        !defs.contains(&coord_pw) && !defs.contains(&worker_pw),
        "a password in the clear: {defs}"
    );
    let file = dir.join("definitions.json");
    std::fs::write(&file, &defs).unwrap();
    let (ok, out) = rabbitmqctl(&["import_definitions", &file.display().to_string()]);
    assert!(ok, "{out}");

    // The worker starts first: the queues do not exist, and it may not declare them. It
    // waits (reconnecting) until the coordinator has.
    let worker_env = with_amqp(&env, url_for(&worker, &worker_pw));
    let coord_env = with_amqp(&env, url_for(&coord, &coord_pw));
    let mut w = worker_env
        .cmd("rekey-worker", &["--worker-id", "least"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_guarded();
    let (ok, out, err) = coord_env.run(
        "rekey",
        &quick_rotate(&["--batch-size", "500", "--max-error-rate", "0.05", "--json"]),
    );
    sigterm(&w);
    let code = wait_exit(&mut w, Duration::from_secs(60));
    let mut werr = String::new();
    std::io::Read::read_to_string(w.stderr.as_mut().unwrap(), &mut werr).unwrap();
    assert!(ok, "rotate: {out}{err}\nworker: {werr}");
    assert!(code.success(), "{werr}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["run"]["state"], "completed", "{out}");
    let (ok, out, err) = env.run("rekey-loadtest", &["verify", "--json"]);
    assert!(ok, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["mismatched"], 0, "{out}");

    // What the worker user may not do.
    let topo = broker::Topology::new(&db.name);
    let conn = broker::connect(&SecretString::from(url_for(&worker, &worker_pw)), "t")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let delete = ch
        .queue_delete(topo.batches.as_str().into(), Default::default())
        .await;
    assert!(
        format!("{:?}", delete.unwrap_err()).contains("ACCESS_REFUSED"),
        "a worker user deleted the batch queue"
    );
    let ch = conn.create_channel().await.unwrap();
    let consume = ch
        .basic_consume(
            topo.reports.as_str().into(),
            "t".into(),
            Default::default(),
            Default::default(),
        )
        .await;
    assert!(
        format!("{:?}", consume.unwrap_err()).contains("ACCESS_REFUSED"),
        "a worker user read the reports"
    );
    let ch = conn.create_channel().await.unwrap();
    let declare = ch
        .queue_declare("elsewhere".into(), Default::default(), Default::default())
        .await;
    assert!(
        format!("{:?}", declare.unwrap_err()).contains("ACCESS_REFUSED"),
        "a worker user declared a queue"
    );
    // Nor the coordinator user outside its prefix.
    let conn = broker::connect(&SecretString::from(url_for(&coord, &coord_pw)), "t")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let declare = ch
        .queue_declare(
            "other.batches".into(),
            Default::default(),
            Default::default(),
        )
        .await;
    assert!(
        format!("{:?}", declare.unwrap_err()).contains("ACCESS_REFUSED"),
        "a coordinator user declared another prefix's queue"
    );
    let ch = conn.create_channel().await.unwrap();
    broker::delete(&ch, &topo).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
