//! The shared key store on a real PostgreSQL, through the real binary: two proxies on one
//! database, keys made and changed by the CLI and by either proxy's key API, the database going
//! down and coming back, a proxy starting while it is down (with and without a key cache),
//! poll-only mode, fleet-wide usage, TLS with verify-full, concurrent migrations, imports, and
//! the password never appearing anywhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg_support;
mod support;

use std::time::Duration;

use pg_support::{Postgres, PASSWORD};
use serde_json::{json, Value};
use support::*;

const PREFIX: &str = "/_portcullis/v1/keys";

const POLICY_TEXT: &str = r#"version: 1
routes:
  - match: GET /v1/datasets
    resource: datasets
    access: read
  - match: GET /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: read
roles:
  viewer: ["datasets:read", "api_keys:write"]
  admin: ["*:*", "api_keys:manage"]
principals:
  vera: { kind: user, roles: [viewer] }
  ada: { kind: user, roles: [admin] }
  bot: { kind: robot, grants: ["datasets:read"] }
"#;

/// How fast a change must reach every proxy (SPEC: 2 s).
const PROPAGATION: Duration = Duration::from_secs(2);

fn cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = std::process::Command::new(BIN);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn cli_ok(args: &[&str]) -> String {
    let out = cli(args, &[]);
    assert!(
        out.status.success(),
        "portcullis {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A proxy on the database at `url`, with a fast feed.
async fn proxy_on(backend: &RecordingBackend, url: &str, extra: &str) -> Proxy {
    let ws = Workspace::new();
    ws.write("policy.yaml", POLICY_TEXT);
    ws.write(
        "portcullis.yaml",
        &format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstream: {}\npolicy: policy.yaml\nkeys: {url}\nkey_store:\n  poll_interval: 250ms\n  usage_flush_interval: 300ms\n{extra}",
            backend.url()
        ),
    );
    Proxy::spawn(ws).await
}

async fn status(proxy: &Proxy, path: &str, key: &str) -> u16 {
    let auth = format!("Bearer {key}");
    send(proxy.addr, "GET", path, &[("authorization", &auth)], "")
        .await
        .status
}

async fn api(proxy: &Proxy, method: &str, path: &str, key: &str, body: Value) -> Resp {
    let auth = format!("Bearer {key}");
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    send(proxy.addr, method, path, &[("authorization", &auth)], &body).await
}

async fn works_within(proxy: &Proxy, key: &str, expected: u16) {
    let addr = proxy.addr;
    let key = key.to_string();
    eventually(
        &format!("the key answers {expected} on {addr}"),
        PROPAGATION,
        || {
            let key = key.clone();
            async move {
                let auth = format!("Bearer {key}");
                send(addr, "GET", "/v1/datasets", &[("authorization", &auth)], "")
                    .await
                    .status
                    == expected
            }
        },
    )
    .await;
}

fn create_with_cli(url: &str, principal: &str) -> String {
    cli_ok(&["keys", "create", "--keys", url, "--principal", principal])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_every_key_change_within_two_seconds() {
    let pg = Postgres::start();
    let url = pg.url();
    let admin_key = create_with_cli(&url, "ada");
    let backend = RecordingBackend::start().await;
    let a = proxy_on(&backend, &url, "").await;
    let b = proxy_on(&backend, &url, "").await;
    assert_eq!(status(&a, "/v1/datasets", &admin_key).await, 200);
    assert_eq!(status(&b, "/v1/datasets", &admin_key).await, 200);

    // Made with the CLI: works on both.
    let cli_key = create_with_cli(&url, "vera");
    works_within(&a, &cli_key, 200).await;
    works_within(&b, &cli_key, 200).await;

    // Made through A's key API: works on B.
    let made = api(&a, "POST", PREFIX, &admin_key, json!({"principal": "bot"})).await;
    assert_eq!(made.status, 201, "{}", made.text());
    let bot_key = made.json()["key"].as_str().unwrap().to_string();
    let bot_id = made.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        status(&a, "/v1/datasets", &bot_key).await,
        200,
        "live on A at once"
    );
    works_within(&b, &bot_key, 200).await;

    // Deactivated through B: refused on A; activated again through the CLI.
    let off = api(
        &b,
        "POST",
        &format!("{PREFIX}/{bot_id}/deactivate"),
        &admin_key,
        Value::Null,
    )
    .await;
    assert_eq!(off.status, 200, "{}", off.text());
    works_within(&a, &bot_key, 401).await;
    cli_ok(&["keys", "activate", "--keys", &url, &bot_id]);
    works_within(&a, &bot_key, 200).await;
    works_within(&b, &bot_key, 200).await;

    // Rotated with overlap through A: both keys work on B; revoked through the CLI: gone.
    let rotated = api(
        &a,
        "POST",
        &format!("{PREFIX}/{bot_id}/rotate"),
        &admin_key,
        json!({"overlap": "1h"}),
    )
    .await;
    assert_eq!(rotated.status, 201, "{}", rotated.text());
    let successor = rotated.json()["key"].as_str().unwrap().to_string();
    works_within(&b, &successor, 200).await;
    assert_eq!(
        status(&b, "/v1/datasets", &bot_key).await,
        200,
        "overlap keeps the old key"
    );
    cli_ok(&["keys", "revoke", "--keys", &url, &bot_id]);
    works_within(&a, &bot_key, 401).await;
    works_within(&b, &bot_key, 401).await;
    assert_eq!(status(&b, "/v1/datasets", &successor).await, 200);

    // 16 concurrent creates spread over both proxies lose nothing.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        let auth = format!("Bearer {admin_key}");
        tasks.push(tokio::spawn(async move {
            let body =
                json!({"principal": "vera", "purpose": format!("concurrent {i}")}).to_string();
            send(addr, "POST", PREFIX, &[("authorization", &auth)], &body).await
        }));
    }
    let mut secrets = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
        secrets.push(r.json()["key"].as_str().unwrap().to_string());
    }
    assert_eq!(
        pg.query("SELECT count(*) FROM portcullis.keys WHERE purpose LIKE 'concurrent %' AND NOT revoked"),
        "16"
    );
    for secret in &secrets {
        works_within(&a, secret, 200).await;
        works_within(&b, secret, 200).await;
    }
    // The database holds hashes, never a key.
    let dump = pg.query("SELECT string_agg(id || hash || prefix, ',') FROM portcullis.keys");
    for secret in secrets.iter().chain([&admin_key, &bot_key]) {
        assert!(!dump.contains(secret.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_down_proxies_serve_the_last_state_and_changes_answer_503() {
    let mut pg = Postgres::start();
    let url = pg.url();
    let admin_key = create_with_cli(&url, "ada");
    let vera_key = create_with_cli(&url, "vera");
    let backend = RecordingBackend::start().await;
    let a = proxy_on(&backend, &url, "").await;
    let b = proxy_on(&backend, &url, "").await;
    pg.stop();
    tokio::time::sleep(Duration::from_millis(600)).await;
    for p in [&a, &b] {
        assert_eq!(status(p, "/v1/datasets", &vera_key).await, 200);
        assert_eq!(
            get(p.admin, "/readyz", &[]).await.status,
            200,
            "stays ready"
        );
    }
    let refused = api(&a, "POST", PREFIX, &admin_key, json!({"principal": "bot"})).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    let off = api(
        &b,
        "POST",
        &format!("{PREFIX}/{}/deactivate", &vera_key[4..12]),
        &admin_key,
        Value::Null,
    )
    .await;
    assert_eq!(off.status, 503);
    pg.run();
    assert_eq!(
        pg.query("SELECT count(*) FROM portcullis.keys"),
        "2",
        "nothing was written while the database was down"
    );
    // Back: a change flows again within 5 s.
    let made = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let r = api(&a, "POST", PREFIX, &admin_key, json!({"principal": "bot"})).await;
            if r.status == 201 {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the key API works again within 5 s");
    let bot_key = made.json()["key"].as_str().unwrap().to_string();
    works_within(&b, &bot_key, 200).await;
    assert!(!a.stderr().contains(PASSWORD) && !b.stderr().contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_while_the_database_is_down_serves_the_key_cache_or_is_not_ready() {
    let mut pg = Postgres::start();
    let url = pg.url();
    let vera_key = create_with_cli(&url, "vera");
    let backend = RecordingBackend::start().await;
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("keys-cache");
    let with_cache = format!("key_cache: {}\n", cache.display());
    // A first proxy fills the cache (full load, then a change through the feed).
    let first = proxy_on(&backend, &url, &with_cache).await;
    let later_key = create_with_cli(&url, "bot");
    works_within(&first, &later_key, 200).await;
    drop(first);
    pg.stop();
    let cached = proxy_on(&backend, &url, &with_cache).await;
    assert_eq!(get(cached.admin, "/readyz", &[]).await.status, 200);
    assert_eq!(status(&cached, "/v1/datasets", &vera_key).await, 200);
    assert_eq!(
        status(&cached, "/v1/datasets", &later_key).await,
        200,
        "the change is cached too"
    );
    // Without a cache there is no state to serve: not ready, and no key works.
    let ws = Workspace::new();
    ws.write("policy.yaml", POLICY_TEXT);
    ws.write(
        "portcullis.yaml",
        &format!("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstream: {}\npolicy: policy.yaml\nkeys: {url}\nkey_store:\n  poll_interval: 250ms\n", backend.url()),
    );
    let bare = spawn_unready(ws).await;
    assert_eq!(get(bare.1, "/readyz", &[]).await.status, 503);
    assert_eq!(
        send(
            bare.0,
            "GET",
            "/v1/datasets",
            &[("authorization", &format!("Bearer {vera_key}"))],
            ""
        )
        .await
        .status,
        401
    );
    // The database comes back: it becomes ready by itself.
    pg.run();
    let admin = bare.1;
    eventually(
        "ready once the database answers",
        Duration::from_secs(10),
        || async move { get(admin, "/readyz", &[]).await.status == 200 },
    )
    .await;
    assert_eq!(
        send(
            bare.0,
            "GET",
            "/v1/datasets",
            &[("authorization", &format!("Bearer {vera_key}"))],
            ""
        )
        .await
        .status,
        200
    );
    let cache_text = std::fs::read_to_string(cache.join("keys.yaml")).unwrap();
    assert!(
        !cache_text.contains(&vera_key),
        "the cache holds hashes only"
    );
    drop(bare);
}

/// A proxy process that is not expected to become ready (killed when dropped, so the child and
/// its folder are held).
#[allow(dead_code)]
struct Unready(
    std::net::SocketAddr,
    std::net::SocketAddr,
    tokio::process::Child,
    Workspace,
    std::sync::Arc<std::sync::Mutex<String>>,
);

/// Starts a proxy that is expected not to become ready; returns its addresses and the process.
async fn spawn_unready(ws: Workspace) -> Unready {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(BIN)
        .arg("run")
        .arg("-c")
        .arg(ws.path("portcullis.yaml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = drain_to_string(child.stderr.take().unwrap());
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut proxy, mut admin) = (None, None);
    while proxy.is_none() || admin.is_none() {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("listening lines");
        if let Some(rest) = line.strip_prefix("listening proxy http://") {
            proxy = Some(rest.parse().unwrap());
        } else if let Some(rest) = line.strip_prefix("listening admin http://") {
            admin = Some(rest.parse().unwrap());
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Unready(proxy.unwrap(), admin.unwrap(), child, ws, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_only_mode_carries_every_change_without_listen() {
    let pg = Postgres::start();
    let url = pg.url();
    let backend = RecordingBackend::start().await;
    let p = proxy_on(&backend, &url, "").await;
    drop(p);
    let ws = Workspace::new();
    ws.write("policy.yaml", POLICY_TEXT);
    ws.write(
        "portcullis.yaml",
        &format!("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstream: {}\npolicy: policy.yaml\nkeys: {url}\nkey_store:\n  notify: false\n  poll_interval: 500ms\n", backend.url()),
    );
    let poller = Proxy::spawn(ws).await;
    for _ in 0..3 {
        let key = create_with_cli(&url, "vera");
        works_within(&poller, &key, 200).await;
    }
    let listening = pg.query("SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%'");
    assert_eq!(listening, "0", "poll-only mode never LISTENs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_adds_up_across_proxies() {
    let pg = Postgres::start();
    let url = pg.url();
    let admin_key = create_with_cli(&url, "ada");
    let vera_key = create_with_cli(&url, "vera");
    let vera_id = vera_key[4..12].to_string();
    let backend = RecordingBackend::start().await;
    let a = proxy_on(&backend, &url, "").await;
    let b = proxy_on(&backend, &url, "").await;
    for _ in 0..3 {
        assert_eq!(status(&a, "/v1/datasets", &vera_key).await, 200);
    }
    for _ in 0..4 {
        assert_eq!(status(&b, "/v1/datasets", &vera_key).await, 200);
    }
    eventually(
        "the store totals 7 calls",
        Duration::from_secs(5),
        || async {
            pg.query(&format!(
                "SELECT coalesce(max(calls), 0) FROM portcullis.usage WHERE key_id = '{vera_id}'"
            )) == "7"
        },
    )
    .await;
    // Either proxy's key API shows the fleet total; so does `keys list`.
    let got = api(
        &a,
        "GET",
        &format!("{PREFIX}/{vera_id}"),
        &admin_key,
        Value::Null,
    )
    .await;
    assert_eq!(got.json()["calls"], 7, "{}", got.text());
    assert!(got.json()["last_used"].is_string());
    let listed = cli_ok(&["keys", "list", "--keys", &url, "--json"]);
    let vera: Value = listed
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["id"] == vera_id.as_str())
        .unwrap();
    assert_eq!(vera["calls"], 7);
    // Stopping a proxy flushes what it has left.
    assert_eq!(status(&b, "/v1/datasets", &vera_key).await, 200);
    assert!(b.terminate().await.success());
    assert_eq!(
        pg.query(&format!(
            "SELECT calls FROM portcullis.usage WHERE key_id = '{vera_id}'"
        )),
        "8"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_a_generated_ca_works_and_a_wrong_ca_is_refused() {
    let pg = Postgres::start_tls();
    let ca = pg.tls.as_ref().unwrap().ca.clone();
    let url = format!(
        "{}&sslrootcert={}",
        pg.url_without_password("verify-full"),
        ca.display()
    );
    let env = [("PGPASSWORD", PASSWORD)];
    let out = cli(
        &["keys", "create", "--keys", &url, "--principal", "vera"],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(key.starts_with("pcs_"));
    assert_eq!(
        pg.query("SELECT count(*) FROM pg_stat_ssl WHERE ssl"),
        "0",
        "(the CLI has disconnected)"
    );
    // A CA that did not sign the server's certificate: refused, and the message is plain.
    let other = tempfile::NamedTempFile::new().unwrap();
    let stranger = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
    std::fs::write(other.path(), stranger.cert.pem()).unwrap();
    let bad = format!(
        "{}&sslrootcert={}",
        pg.url_without_password("verify-full"),
        other.path().display()
    );
    let out = cli(&["keys", "list", "--keys", &bad], &env);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains(PASSWORD), "{stderr}");
    assert!(
        stderr.contains("unavailable") || stderr.contains("certificate"),
        "{stderr}"
    );
    // `require` encrypts without verifying.
    let out = cli(
        &[
            "keys",
            "list",
            "--keys",
            &pg.url_without_password("require"),
        ],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_once_when_many_start_together_and_import_is_idempotent() {
    let pg = Postgres::start();
    let url = pg.url();
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || cli(&["keys", "list", "--keys", &url], &[]))
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every migration ran exactly once (two versions: the tables, then usage's fillfactor).
    assert_eq!(
        pg.query("SELECT count(*) FROM portcullis.schema_migrations"),
        "2"
    );
    assert_eq!(
        pg.query("SELECT string_agg(version::text, ',' ORDER BY version) FROM portcullis.schema_migrations"),
        "1,2"
    );
    assert_eq!(
        pg.query("SELECT reloptions::text FROM pg_class WHERE oid = 'portcullis.usage'::regclass"),
        "{fillfactor=70}"
    );
    // Import a keys file twice: the second time adds nothing.
    let ws = Workspace::new();
    let a = TestKey::new("vera");
    let b = TestKey::new("bot");
    ws.write("keys.yaml", &keys_yaml(&[&a, &b]));
    let from = ws.path("keys.yaml");
    for expected in ["imported 2 of 2", "imported 0 of 2"] {
        let out = cli(
            &[
                "keys",
                "import",
                "--keys",
                &url,
                "--from",
                from.to_str().unwrap(),
            ],
            &[],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains(expected));
    }
    assert_eq!(pg.query("SELECT count(*) FROM portcullis.keys"), "2");
    // The imported keys work, and `check` and `explain` read the store.
    let backend = RecordingBackend::start().await;
    let p = proxy_on(&backend, &url, "").await;
    assert_eq!(status(&p, "/v1/datasets", &a.key).await, 200);
    let policy = p.workspace.path("policy.yaml");
    let checked = cli(
        &[
            "check",
            "--policy",
            policy.to_str().unwrap(),
            "--keys",
            &url,
        ],
        &[],
    );
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(String::from_utf8_lossy(&checked.stdout).contains("2 keys"));
    let explained = cli_ok(&[
        "explain",
        "--policy",
        policy.to_str().unwrap(),
        "--keys",
        &url,
        "--key-id",
        &a.id,
        "GET",
        "/v1/datasets",
    ]);
    assert!(explained.starts_with("allow"), "{explained}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_appears_in_a_message() {
    let mut pg = Postgres::start();
    let url = pg.url();
    pg.stop();
    let backend = RecordingBackend::start().await;
    let ws = Workspace::new();
    ws.write("policy.yaml", POLICY_TEXT);
    let audit = ws.path("audit.jsonl");
    ws.write(
        "portcullis.yaml",
        &format!("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstream: {}\npolicy: policy.yaml\nkeys: {url}\naudit:\n  file: {}\n", backend.url(), audit.display()),
    );
    for args in [
        vec!["keys", "list", "--keys", &url],
        vec!["keys", "create", "--keys", &url, "--principal", "vera"],
        vec![
            "check",
            "--policy",
            ws.path("policy.yaml").to_str().unwrap(),
            "--keys",
            &url,
        ],
        vec!["check", "-c", ws.path("portcullis.yaml").to_str().unwrap()],
    ] {
        let out = cli(&args, &[]);
        assert!(!out.status.success(), "{args:?} with the database down");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains(PASSWORD), "{args:?}: {all}");
        assert!(
            all.contains("portcullis:***@"),
            "{args:?} names the store: {all}"
        );
    }
    let unready = spawn_unready(ws).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let logged = unready.4.lock().unwrap().clone();
    assert!(logged.contains("portcullis:***@"), "{logged}");
    assert!(!logged.contains(PASSWORD), "{logged}");
    let audit_text = std::fs::read_to_string(&audit).unwrap_or_default();
    assert!(!audit_text.contains(PASSWORD));
}
