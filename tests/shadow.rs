//! `shadow_policy:` through the real binary: every request is also decided with the shadow
//! policy, only the live one is enforced, the audit event says what the shadow would have done,
//! mismatches are counted, and a broken shadow file never affects enforcement.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::*;

const LIVE: &str = r#"version: 1
routes:
  - match: GET /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: read
  - match: PUT /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: write
principals:
  alice: { kind: user, grants: ["datasets:write"] }
"#;

fn events(proxy: &Proxy) -> Vec<serde_json::Value> {
    proxy
        .workspace
        .read("audit.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["kind"] == "decision")
        .collect()
}

async fn mismatches(proxy: &Proxy) -> String {
    get(proxy.admin, "/metrics", &[])
        .await
        .text()
        .lines()
        .filter(|l| l.starts_with("portcullis_shadow_mismatches_total{"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_shadow_decides_too_but_only_the_live_policy_is_enforced() {
    let backend = RecordingBackend::start().await;
    let alice = TestKey::new("alice");
    let ws = Workspace::new();
    ws.write("policy.yaml", LIVE);
    ws.write("keys.yaml", &keys_yaml(&[&alice]));
    // The shadow takes alice's write away.
    ws.write(
        "shadow.yaml",
        &LIVE.replace("datasets:write", "datasets:read"),
    );
    ws.write_config(
        &backend.url(),
        "shadow_policy: shadow.yaml\naudit:\n  file: audit.jsonl\n",
    );
    let proxy = Proxy::spawn(ws).await;
    let auth = format!("Bearer {}", alice.key);
    let headers = [("authorization", auth.as_str())];
    let put = || send(proxy.addr, "PUT", "/v1/datasets/ds_1", &headers, "");
    assert_eq!(put().await.status, 200, "the live policy is enforced");
    assert_eq!(backend.count(), 1);
    eventually(
        "the shadow decision in the audit event",
        PATIENCE,
        || async {
            events(&proxy).iter().any(|e| {
                e["reason"] == "granted"
                    && e["shadow_decision"] == "deny"
                    && e["shadow_reason"] == "forbidden"
            })
        },
    )
    .await;
    assert_eq!(
        mismatches(&proxy).await,
        "portcullis_shadow_mismatches_total{route=\"/v1/datasets/{dataset}\"} 1"
    );

    // A broken shadow changes nothing: enforcement goes on, the last good shadow stays.
    proxy
        .workspace
        .write("shadow.yaml", "version: 1\nroutes: [oops\n");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(put().await.status, 200);
    assert!(
        mismatches(&proxy).await.ends_with("} 2"),
        "{}",
        mismatches(&proxy).await
    );

    // A fixed shadow that agrees: no more mismatches.
    proxy.workspace.write("shadow.yaml", LIVE);
    eventually("the agreeing shadow is loaded", PATIENCE, || async {
        let before = mismatches(&proxy).await;
        let status = put().await.status;
        status == 200 && mismatches(&proxy).await == before
    })
    .await;
    let last = events(&proxy);
    assert!(
        last.iter().all(|e| e["status"] == 200),
        "nothing was refused"
    );
}
