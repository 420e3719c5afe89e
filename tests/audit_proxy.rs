//! The audit stream as the running binary produces it (JSON-lines sink): one event per decision
//! with SPEC's fields, start/reload/shutdown events, key changes from the CLI, gap-free `seq`,
//! never a plaintext key, and `fail_closed` refusing traffic when events cannot be kept.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;

use serde_json::Value;
use support::*;

/// Method, path, headers, expected status.
type Call<'a> = (&'a str, &'a str, Vec<(&'a str, String)>, u16);

fn events(ws: &Workspace) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(ws.path("audit.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn decisions(ws: &Workspace) -> Vec<Value> {
    events(ws)
        .into_iter()
        .filter(|e| e["kind"] == "decision")
        .collect()
}

#[tokio::test]
async fn every_decision_is_an_event_with_the_spec_fields_and_no_secret() {
    let world = World::start_with("audit:\n  file: audit.jsonl\n", &[]).await;
    let ws = &world.proxy.workspace;
    let basic = format!("Basic {}", base64_of(&format!("me:{}", world.viewer.key)));
    let calls: Vec<Call> = vec![
        ("GET", "/v1/datasets/ds_1", vec![world.viewer.bearer()], 200),
        (
            "PUT",
            "/v1/datasets/ds_1",
            vec![("authorization", basic.clone())],
            403,
        ),
        ("GET", "/v1/datasets", vec![], 401),
        (
            "GET",
            "/v1/datasets",
            vec![("x-api-key", "pcs_notarealkey".to_string())],
            401,
        ),
        ("GET", "/v1/%2fetc", vec![world.viewer.bearer()], 400),
        (
            "GET",
            "/status",
            vec![("user-agent", "audit-test/1.0".to_string())],
            200,
        ),
    ];
    for (method, path, headers, expected) in &calls {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            send(world.proxy.addr, method, path, &headers, "")
                .await
                .status,
            *expected
        );
    }
    eventually("all decisions are written", PATIENCE, || async {
        decisions(ws).len() == calls.len()
    })
    .await;
    let d = decisions(ws);
    let reasons: Vec<&str> = d.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(
        reasons,
        [
            "granted",
            "forbidden",
            "no_credential",
            "unknown_key",
            "bad_path",
            "public"
        ]
    );
    let allowed = &d[0];
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["status"], 200);
    assert_eq!(allowed["upstream_status"], 200);
    assert_eq!(allowed["route"], "/v1/datasets/{dataset}");
    assert_eq!(allowed["resource"], "datasets");
    assert_eq!(allowed["instance"], "ds_1");
    assert_eq!(allowed["access"], "read");
    assert_eq!(allowed["key_id"], world.viewer.id.as_str());
    assert_eq!(allowed["key_prefix"], world.viewer.prefix());
    assert_eq!(allowed["principal"], "victor");
    assert_eq!(allowed["principal_kind"], "user");
    assert_eq!(allowed["client_ip"], "127.0.0.1");
    assert!(allowed["duration_us"].as_u64().is_some());
    assert!(allowed["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(d[1]["decision"], "deny");
    assert_eq!(d[1]["access"], "write");
    assert!(d[1]["upstream_status"].is_null());
    assert_eq!(d[5]["user_agent"], "audit-test/1.0");
    let all = events(ws);
    assert_eq!(all[0]["kind"], "start");
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "seq gap: {seqs:?}"
    );
    let ids: HashSet<&str> = all
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), all.len());
    let text = std::fs::read_to_string(ws.path("audit.jsonl")).unwrap();
    for key in [&world.viewer, &world.editor] {
        assert!(!text.contains(&key.key), "plaintext key in audit");
        assert!(!text.contains(&key.hash()[7..]), "key hash in audit");
    }
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn reloads_and_shutdown_are_audited() {
    let world = World::start_with("audit:\n  file: audit.jsonl\n", &[]).await;
    let ws_path = world.proxy.workspace.path("policy.yaml");
    let policy = std::fs::read_to_string(&ws_path).unwrap();
    std::fs::write(&ws_path, policy.replace("access: read", "acess: read")).unwrap();
    let ws = &world.proxy.workspace;
    eventually("the rejected reload is audited", PATIENCE, || async {
        events(ws)
            .iter()
            .any(|e| e["kind"] == "reload" && e["result"] != "ok")
    })
    .await;
    let rejected = events(ws)
        .into_iter()
        .find(|e| e["kind"] == "reload")
        .unwrap();
    assert_eq!(rejected["file"], "policy");
    assert!(rejected["error"].as_str().unwrap().contains("acess"));
    std::fs::write(&ws_path, format!("{policy}# fixed\n")).unwrap();
    eventually("the good reload is audited", PATIENCE, || async {
        events(ws)
            .iter()
            .any(|e| e["kind"] == "reload" && e["result"] == "ok")
    })
    .await;
    let pid = world.proxy.pid().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(term.success());
    eventually("the shutdown is the last event", PATIENCE, || async {
        events(ws).last().is_some_and(|e| e["kind"] == "shutdown")
    })
    .await;
}

#[test]
fn key_changes_made_with_the_cli_are_audited_without_the_key() {
    let ws = Workspace::new();
    ws.write("policy.yaml", POLICY);
    ws.write("keys.yaml", &keys_yaml(&[]));
    ws.write_config("http://127.0.0.1:9", "audit:\n  file: audit.jsonl\n");
    let config = ws.path("portcullis.yaml");
    let out = std::process::Command::new(BIN)
        .args(["keys", "create", "-c"])
        .arg(&config)
        .arg("--keys")
        .arg(ws.path("keys.yaml"))
        .args(["--principal", "victor"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let id = &key[4..12];
    let status = std::process::Command::new(BIN)
        .args(["keys", "revoke", "-c"])
        .arg(&config)
        .arg("--keys")
        .arg(ws.path("keys.yaml"))
        .arg(id)
        .status()
        .unwrap();
    assert!(status.success());
    let all = events(&ws);
    let actions: Vec<&str> = all.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["key_create", "key_revoke"]);
    for e in &all {
        assert_eq!(e["target_key_id"], id);
        assert_eq!(e["target_principal"], "victor");
        assert_eq!(e["via"], "cli");
    }
    let text = ws.read("audit.jsonl");
    assert!(!text.contains(&key));
}

#[tokio::test]
async fn fail_closed_refuses_traffic_when_the_spool_is_full() {
    let backend = RecordingBackend::start().await;
    let victor = TestKey::new("victor");
    // The SIEM is a closed port, so everything stays in a spool of the smallest allowed size.
    let extra = "audit:\n  fail_closed: true\n  syslog:\n    url: tcp://127.0.0.1:1\n    spool_dir: spool\n    spool_max_bytes: 65536\n";
    let proxy = Proxy::start(&backend.url(), POLICY, &keys_yaml(&[&victor]), extra).await;
    let auth = format!("Bearer {}", victor.key);
    let mut refused = None;
    for i in 0..5000 {
        let r = send(
            proxy.addr,
            "GET",
            "/v1/jobs",
            &[("authorization", &auth)],
            "",
        )
        .await;
        if r.status == 503 {
            refused = Some(i);
            assert_eq!(r.header("content-type"), Some("application/problem+json"));
            break;
        }
        assert_eq!(r.status, 200);
    }
    let at = refused.expect("a full spool must refuse traffic");
    assert!(at > 10, "refused too early, after {at} requests");
    let ready = try_send(proxy.admin, "GET", "/readyz", &[], "")
        .await
        .unwrap();
    assert_eq!(ready.status, 503);
    let answered_before = backend.count();
    assert_eq!(
        send(
            proxy.addr,
            "GET",
            "/v1/jobs",
            &[("authorization", &auth)],
            ""
        )
        .await
        .status,
        503
    );
    assert_eq!(
        backend.count(),
        answered_before,
        "refused requests never reach the backend"
    );
}
