//! Live operations through the real binary: reloads by file watch (rename saves, `keys` CLI
//! writes, the Kubernetes `..data` symlink swap), rejected reloads that keep the old state,
//! SIGHUP, a deleted file, concurrent traffic across many reloads, and graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;

/// A policy where viewers may read jobs, or (when `open`) also cancel them.
fn jobs_policy(open: bool) -> String {
    let viewer = if open {
        r#"["*:read", "jobs:write"]"#
    } else {
        r#"["*:read"]"#
    };
    format!(
        "version: 1\nroutes:\n  - match: GET /v1/jobs\n    resource: jobs\n    access: read\n  - match: POST /v1/jobs/{{job}}/cancel\n    resource: jobs\n    instance: job\n    access: write\n  - match: GET /slow\n    public: true\nroles:\n  viewer: {viewer}\nprincipals:\n  victor: {{ kind: user, roles: [viewer] }}\n"
    )
}

/// Replaces a file the way editors and `keys` do: write a sibling, then rename over.
fn replace_file(path: &std::path::Path, contents: &str) {
    let tmp = path.with_extension("tmp-save");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn cancel(proxy: &Proxy, key: &TestKey) -> u16 {
    let auth = format!("Bearer {}", key.key);
    send(
        proxy.addr,
        "POST",
        "/v1/jobs/j1/cancel",
        &[("authorization", &auth)],
        "",
    )
    .await
    .status
}

async fn generation(proxy: &Proxy) -> u64 {
    let text = get(proxy.admin, "/readyz", &[]).await.text();
    text.trim()
        .rsplit('=')
        .next()
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no generation in {text:?}"))
}

async fn metric_value(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = get(proxy.admin, "/metrics", &[]).await.text();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test]
async fn a_saved_policy_applies_within_a_second() {
    let backend = RecordingBackend::start().await;
    let victor = TestKey::new("victor");
    let proxy = Proxy::start(
        &backend.url(),
        &jobs_policy(false),
        &keys_yaml(&[&victor]),
        "",
    )
    .await;
    assert_eq!(cancel(&proxy, &victor).await, 403);
    let changed = Instant::now();
    replace_file(&proxy.workspace.path("policy.yaml"), &jobs_policy(true));
    eventually("the new policy allows cancel", PATIENCE, || async {
        cancel(&proxy, &victor).await == 200
    })
    .await;
    let took = changed.elapsed();
    println!("policy change to new decision: {took:?}");
    assert!(took < Duration::from_secs(5), "reload took {took:?}");
    assert_eq!(generation(&proxy).await, 2);
    assert_eq!(
        metric_value(
            &proxy,
            "portcullis_reloads_total",
            &[("file", "policy"), ("result", "ok")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_broken_policy_is_rejected_whole_and_the_old_one_keeps_serving() {
    let backend = RecordingBackend::start().await;
    let victor = TestKey::new("victor");
    let proxy = Proxy::start(
        &backend.url(),
        &jobs_policy(true),
        &keys_yaml(&[&victor]),
        "",
    )
    .await;
    let broken = jobs_policy(false).replace("access: write", "acess: write");
    replace_file(&proxy.workspace.path("policy.yaml"), &broken);
    eventually("the rejection is counted", PATIENCE, || async {
        metric_value(
            &proxy,
            "portcullis_reloads_total",
            &[("file", "policy"), ("result", "error")],
        )
        .await
            >= 1.0
    })
    .await;
    assert_eq!(
        cancel(&proxy, &victor).await,
        200,
        "old policy still serves"
    );
    assert_eq!(generation(&proxy).await, 1);
    let log = proxy.stderr();
    assert!(
        log.contains("policy.yaml:") && log.contains("acess"),
        "log: {log}"
    );
    let line = log.lines().find(|l| l.contains("acess")).unwrap();
    assert!(
        line.split("policy.yaml:")
            .nth(1)
            .is_some_and(|rest| rest.chars().next().is_some_and(|c| c.is_ascii_digit())),
        "file:line:column in {line}"
    );
}

#[tokio::test]
async fn keys_changed_by_the_cli_apply_without_restart() {
    let backend = RecordingBackend::start().await;
    let proxy = Proxy::start(&backend.url(), &jobs_policy(false), &keys_yaml(&[]), "").await;
    let keys = proxy.workspace.path("keys.yaml");
    let out = std::process::Command::new(BIN)
        .args(["keys", "create", "--keys"])
        .arg(&keys)
        .args(["--principal", "victor"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let auth = format!("Bearer {key}");
    eventually("the new key is accepted", PATIENCE, || async {
        get(proxy.addr, "/v1/jobs", &[("authorization", &auth)])
            .await
            .status
            == 200
    })
    .await;
    let id = &key[4..12];
    let status = std::process::Command::new(BIN)
        .args(["keys", "deactivate", "--keys"])
        .arg(&keys)
        .arg(id)
        .status()
        .unwrap();
    assert!(status.success());
    eventually("the deactivated key is refused", PATIENCE, || async {
        get(proxy.addr, "/v1/jobs", &[("authorization", &auth)])
            .await
            .status
            == 401
    })
    .await;
}

#[tokio::test]
async fn kubernetes_configmap_symlink_swap_is_picked_up() {
    let backend = RecordingBackend::start().await;
    let victor = TestKey::new("victor");
    let ws = Workspace::new();
    let volume = ws.path("volume");
    let first = volume.join("..2026_11_27_10_00_00.000000001");
    std::fs::create_dir_all(&first).unwrap();
    std::fs::write(first.join("policy.yaml"), jobs_policy(false)).unwrap();
    std::fs::write(first.join("keys.yaml"), keys_yaml(&[&victor])).unwrap();
    std::os::unix::fs::symlink("..2026_11_27_10_00_00.000000001", volume.join("..data")).unwrap();
    for name in ["policy.yaml", "keys.yaml"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), volume.join(name)).unwrap();
    }
    ws.write(
        "portcullis.yaml",
        &format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstream: {}\npolicy: volume/policy.yaml\nkeys: volume/keys.yaml\n",
            backend.url()
        ),
    );
    let proxy = Proxy::spawn(ws).await;
    assert_eq!(cancel(&proxy, &victor).await, 403);
    // What the kubelet does: a new timestamped folder, a temporary symlink to it, and an atomic
    // rename of that symlink over `..data`. The file symlinks themselves never change.
    let second = volume.join("..2026_11_27_10_05_00.000000002");
    std::fs::create_dir_all(&second).unwrap();
    std::fs::write(second.join("policy.yaml"), jobs_policy(true)).unwrap();
    std::fs::write(second.join("keys.yaml"), keys_yaml(&[&victor])).unwrap();
    std::os::unix::fs::symlink("..2026_11_27_10_05_00.000000002", volume.join("..data_tmp"))
        .unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    std::fs::remove_dir_all(&first).unwrap();
    eventually("the swapped ConfigMap applies", PATIENCE, || async {
        cancel(&proxy, &victor).await == 200
    })
    .await;
}

#[tokio::test]
async fn a_deleted_file_keeps_the_last_good_state_and_says_so() {
    let backend = RecordingBackend::start().await;
    let victor = TestKey::new("victor");
    let proxy = Proxy::start(
        &backend.url(),
        &jobs_policy(true),
        &keys_yaml(&[&victor]),
        "",
    )
    .await;
    std::fs::remove_file(proxy.workspace.path("keys.yaml")).unwrap();
    eventually("the missing file is reported", PATIENCE, || async {
        let log = proxy.stderr();
        log.contains("deleted? keeping the last good state")
    })
    .await;
    assert_eq!(cancel(&proxy, &victor).await, 200);
    assert!(
        metric_value(
            &proxy,
            "portcullis_reloads_total",
            &[("file", "keys"), ("result", "error")]
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn sighup_reloads_and_an_unchanged_file_is_not_a_new_generation() {
    let backend = RecordingBackend::start().await;
    let victor = TestKey::new("victor");
    let proxy = Proxy::start(
        &backend.url(),
        &jobs_policy(false),
        &keys_yaml(&[&victor]),
        "",
    )
    .await;
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    eventually("SIGHUP is logged", PATIENCE, || async {
        proxy.stderr().contains("SIGHUP")
    })
    .await;
    assert_eq!(generation(&proxy).await, 1, "same content, same generation");
    assert_eq!(cancel(&proxy, &victor).await, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_see_only_old_or_new_answers_across_fifty_reloads() {
    let backend = RecordingBackend::start().await;
    let victor = TestKey::new("victor");
    let proxy = Proxy::start(
        &backend.url(),
        &jobs_policy(false),
        &keys_yaml(&[&victor]),
        "",
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (addr, auth, stop) = (proxy.addr, format!("Bearer {}", victor.key), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = try_send(
                    addr,
                    "POST",
                    "/v1/jobs/j1/cancel",
                    &[("authorization", &auth)],
                    "",
                )
                .await;
                seen.push(r.map(|r| r.status));
            }
            seen
        }));
    }
    let policy = proxy.workspace.path("policy.yaml");
    for round in 0..50u64 {
        replace_file(&policy, &jobs_policy(round % 2 == 0));
        eventually("the reload lands", PATIENCE, || async {
            generation(&proxy).await == round + 2
        })
        .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        for answer in client.await.unwrap() {
            total += 1;
            match answer {
                Ok(200) | Ok(403) => {}
                other => panic!("unexpected answer during reloads: {other:?}"),
            }
        }
    }
    assert!(total > 50, "clients made {total} requests");
    println!("{total} requests across 50 reloads, all 200 or 403");
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let backend = RecordingBackend::with_slow_delay(Duration::from_millis(1500)).await;
    let victor = TestKey::new("victor");
    let proxy = Proxy::start(
        &backend.url(),
        &jobs_policy(false),
        &keys_yaml(&[&victor]),
        "",
    )
    .await;
    let addr = proxy.addr;
    let slow = tokio::spawn(async move { try_send(addr, "GET", "/slow", &[], "").await });
    eventually("the slow request reached the backend", PATIENCE, || async {
        backend.count() == 1
    })
    .await;
    let admin = proxy.admin;
    let pid = proxy.pid();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    eventually("readyz reports draining", PATIENCE, || async {
        try_send(admin, "GET", "/readyz", &[], "")
            .await
            .map(|r| r.status)
            != Ok(200)
    })
    .await;
    let answer = slow.await.unwrap().expect("in-flight request completes");
    assert_eq!(answer.status, 200);
    let status = proxy.terminate().await;
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn a_certificate_that_does_not_match_its_key_is_a_plain_config_error() {
    let ws = Workspace::new();
    let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    ws.write("cert.pem", &a.cert.pem());
    ws.write("key.pem", &b.key_pair.serialize_pem());
    ws.write("policy.yaml", &jobs_policy(false));
    ws.write("keys.yaml", &keys_yaml(&[]));
    ws.write_config(
        "http://127.0.0.1:9",
        "tls:\n  cert: cert.pem\n  key: key.pem\n",
    );
    let out = std::process::Command::new(BIN)
        .args(["run", "-c"])
        .arg(ws.path("portcullis.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match the certificate"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn a_symlink_loop_is_reported_and_the_last_good_state_keeps_serving() {
    let backend = RecordingBackend::start().await;
    let victor = TestKey::new("victor");
    let proxy = Proxy::start(
        &backend.url(),
        &jobs_policy(true),
        &keys_yaml(&[&victor]),
        "",
    )
    .await;
    let policy = proxy.workspace.path("policy.yaml");
    let other = proxy.workspace.path("policy-loop.yaml");
    std::fs::remove_file(&policy).unwrap();
    std::os::unix::fs::symlink(&other, &policy).unwrap();
    std::os::unix::fs::symlink(&policy, &other).unwrap();
    eventually("the loop is reported", PATIENCE, || async {
        proxy.stderr().contains("symlink loop")
    })
    .await;
    assert_eq!(cancel(&proxy, &victor).await, 200);
    assert_eq!(generation(&proxy).await, 1);
}
