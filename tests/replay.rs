//! `portcullis replay` on an audit stream the real proxy wrote: the same policy changes nothing
//! (exit 0), a stricter one reports each decision that would flip, grouped by route and
//! principal (exit 1), corrupt lines are named and skipped, and unreadable files exit 64.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use support::*;

const OLD: &str = r#"version: 1
routes:
  - match: GET /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: read
  - match: PUT /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: write
  - match: GET /status
    public: true
principals:
  alice: { kind: user, grants: ["datasets:write"] }
  victor: { kind: user, grants: ["datasets:read"] }
"#;

fn replay(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).arg("replay").args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn replay_reports_what_a_new_policy_would_change() {
    let backend = RecordingBackend::start().await;
    let (alice, victor) = (TestKey::new("alice"), TestKey::new("victor"));
    let proxy = Proxy::start(
        &backend.url(),
        OLD,
        &keys_yaml(&[&alice, &victor]),
        "audit:\n  file: audit.jsonl\n",
    )
    .await;
    let call = |method: &'static str, path: &'static str, key: Option<&TestKey>| {
        let auth = key.map(|k| format!("Bearer {}", k.key));
        let addr = proxy.addr;
        async move {
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("authorization", a.as_str())).collect();
            send(addr, method, path, &headers, "").await.status
        }
    };
    for _ in 0..3 {
        assert_eq!(call("PUT", "/v1/datasets/ds_1", Some(&alice)).await, 200);
    }
    assert_eq!(call("GET", "/v1/datasets/ds_1", Some(&victor)).await, 200);
    assert_eq!(call("PUT", "/v1/datasets/ds_1", Some(&victor)).await, 403);
    assert_eq!(call("GET", "/v1/datasets/ds_1", None).await, 401);
    assert_eq!(call("GET", "/status", None).await, 200);
    let ws = &proxy.workspace;
    eventually("seven decisions in the audit file", PATIENCE, || async {
        ws.read("audit.jsonl")
            .lines()
            .filter(|l| l.contains("\"kind\":\"decision\""))
            .count()
            == 7
    })
    .await;
    let audit = ws.path("audit.jsonl");
    let keys = ws.path("keys.yaml");
    let (audit, keys) = (audit.to_str().unwrap(), keys.to_str().unwrap());

    // The same policy: nothing changes.
    let same = ws.path("policy.yaml");
    let (code, stdout, stderr) =
        replay(&["--policy", same.to_str().unwrap(), "--keys", keys, audit]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("7 decisions replayed, 0 would change"),
        "{stdout}"
    );

    // alice loses write, victor gains it: each flip is reported with its count.
    let new = ws.write(
        "new-policy.yaml",
        &OLD.replace(
            "alice: { kind: user, grants: [\"datasets:write\"] }",
            "alice: { kind: user, grants: [\"datasets:read\"] }",
        )
        .replace(
            "victor: { kind: user, grants: [\"datasets:read\"] }",
            "victor: { kind: user, grants: [\"datasets:write\"] }",
        ),
    );
    let (code, stdout, stderr) =
        replay(&["--policy", new.to_str().unwrap(), "--keys", keys, audit]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("PUT /v1/datasets/{dataset}  alice  allow(granted) → deny(forbidden)  3"),
        "{stdout}"
    );
    assert!(
        stdout.contains("PUT /v1/datasets/{dataset}  victor  deny(forbidden) → allow(granted)  1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("7 decisions replayed, 4 would change"),
        "{stdout}"
    );

    // Without --keys each principal is replayed with its full access: the same answer here.
    let (code, stdout, _) = replay(&["--policy", new.to_str().unwrap(), audit]);
    assert_eq!(code, Some(1));
    assert!(stdout.contains("4 would change"), "{stdout}");

    // Corrupt lines are named by number and skipped.
    let mut text = ws.read("audit.jsonl");
    text.insert_str(0, "{not json\n");
    let broken = ws.write("broken.jsonl", &text);
    let (code, stdout, stderr) =
        replay(&["--policy", same.to_str().unwrap(), broken.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stderr.contains("broken.jsonl:1: not an audit event"),
        "{stderr}"
    );
    assert!(stdout.contains("1 corrupt lines skipped"), "{stdout}");

    // A file that cannot be read: 64.
    let (code, _, stderr) = replay(&[
        "--policy",
        same.to_str().unwrap(),
        "/nonexistent/audit.jsonl",
    ]);
    assert_eq!(code, Some(64), "{stderr}");
}
