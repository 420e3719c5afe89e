//! The self-service key API through the real binary: self-service create/list, refusal without
//! `api_keys:write`, an admin creating keys for others, escalation attempts, rotation overlap,
//! keys shown once, concurrent creates, and that nothing under the prefix reaches the backend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const PREFIX: &str = "/_portcullis/v1/keys";

const POLICY_TEXT: &str = r#"version: 1
routes:
  - match: GET /v1/datasets
    resource: datasets
    access: read
  - match: PUT /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: write
roles:
  viewer: ["*:read", "api_keys:write"]
  locked: ["*:read", "api_keys:read"]
  editor: ["*:read", "*:write"]
  admin: ["*:*", "api_keys:manage"]
principals:
  vera: { kind: user, roles: [viewer] }
  lou: { kind: user, roles: [locked] }
  ed: { kind: user, roles: [editor] }
  ada: { kind: user, roles: [admin] }
"#;

struct Api {
    backend: RecordingBackend,
    proxy: Proxy,
    vera: TestKey,
    lou: TestKey,
    ada: TestKey,
    ada_read_only: TestKey,
}

impl Api {
    async fn start() -> Api {
        let backend = RecordingBackend::start().await;
        let vera = TestKey::new("vera");
        let lou = TestKey::new("lou");
        let ada = TestKey::new("ada");
        let ada_read_only = TestKey::new("ada").scopes(&["*:read", "api_keys:write"]);
        let keys = keys_yaml(&[&vera, &lou, &ada, &ada_read_only]);
        let proxy = Proxy::start(&backend.url(), POLICY_TEXT, &keys, "").await;
        Api {
            backend,
            proxy,
            vera,
            lou,
            ada,
            ada_read_only,
        }
    }

    async fn call(&self, method: &str, path: &str, key: &str, body: Value) -> Resp {
        let auth = format!("Bearer {key}");
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        send(
            self.proxy.addr,
            method,
            path,
            &[("authorization", &auth)],
            &body,
        )
        .await
    }

    async fn create(&self, caller: &str, body: Value) -> Resp {
        self.call("POST", PREFIX, caller, body).await
    }

    async fn status(&self, method: &str, path: &str, key: &str) -> u16 {
        let auth = format!("Bearer {key}");
        send(
            self.proxy.addr,
            method,
            path,
            &[("authorization", &auth)],
            "",
        )
        .await
        .status
    }
}

fn secret_of(resp: &Resp) -> String {
    assert_eq!(resp.status, 201, "{}", resp.text());
    resp.json()["key"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_viewer_creates_and_lists_own_keys_and_the_new_key_works_at_once() {
    let api = Api::start().await;
    let resp = api
        .create(
            &api.vera.key,
            json!({"purpose": "notebook", "expires": "30d"}),
        )
        .await;
    let secret = secret_of(&resp);
    let object = resp.json();
    assert_eq!(object["principal"], "vera");
    assert_eq!(object["prefix"], &secret[..10]);
    assert_eq!(object["purpose"], "notebook");
    assert!(object["expires"].as_str().unwrap().ends_with('Z'));
    assert!(object.get("hash").is_none());
    // Works on the very next request, no waiting for the watcher.
    assert_eq!(api.status("GET", "/v1/datasets", &secret).await, 200);
    let list = api.call("GET", PREFIX, &api.vera.key, Value::Null).await;
    assert_eq!(list.status, 200);
    let listed: Vec<String> = list.json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["principal"].as_str().unwrap().to_string())
        .collect();
    assert!(listed.iter().all(|p| p == "vera"), "{listed:?}");
    assert_eq!(listed.len(), 2);
    let text = list.text();
    assert!(!text.contains(&secret) && !text.contains("sha256:"));
    let id = object["id"].as_str().unwrap();
    let one = api
        .call("GET", &format!("{PREFIX}/{id}"), &api.vera.key, Value::Null)
        .await;
    assert_eq!(one.status, 200);
    assert!(!one.text().contains(&secret));
    assert!(one.json().get("key").is_none(), "the key is shown once");
    let file = api.proxy.workspace.read("keys.yaml");
    assert!(!file.contains(&secret), "never stored in plaintext");
    assert_eq!(
        api.backend.count(),
        1,
        "only the dataset read reached the backend"
    );
}

#[tokio::test]
async fn a_role_without_api_keys_write_cannot_create_but_can_list_its_own() {
    let api = Api::start().await;
    let resp = api.create(&api.lou.key, json!({})).await;
    assert_eq!(resp.status, 403);
    assert!(resp.json()["detail"]
        .as_str()
        .unwrap()
        .contains("api_keys:write"));
    let list = api.call("GET", PREFIX, &api.lou.key, Value::Null).await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["keys"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn an_admin_creates_a_key_for_another_user_at_that_users_level() {
    let api = Api::start().await;
    let resp = api
        .create(
            &api.ada.key,
            json!({"principal": "vera", "purpose": "for vera"}),
        )
        .await;
    let secret = secret_of(&resp);
    assert_eq!(resp.json()["principal"], "vera");
    assert_eq!(api.status("GET", "/v1/datasets", &secret).await, 200);
    assert_eq!(api.status("PUT", "/v1/datasets/d1", &secret).await, 403);
    // The admin sees every principal's keys; vera does not see ada's.
    let all = api
        .call("GET", PREFIX, &api.ada.key, Value::Null)
        .await
        .json();
    assert_eq!(all["keys"].as_array().unwrap().len(), 5);
    let filtered = api
        .call(
            "GET",
            &format!("{PREFIX}?principal=lou"),
            &api.ada.key,
            Value::Null,
        )
        .await
        .json();
    assert_eq!(filtered["keys"].as_array().unwrap().len(), 1);
    let hidden = api
        .call(
            "GET",
            &format!("{PREFIX}/{}", api.ada.id),
            &api.vera.key,
            Value::Null,
        )
        .await;
    assert_eq!(
        hidden.status, 404,
        "another principal's key is not revealed"
    );
    let refused = api
        .call(
            "GET",
            &format!("{PREFIX}?principal=ada"),
            &api.vera.key,
            Value::Null,
        )
        .await;
    assert_eq!(refused.status, 403);
}

#[tokio::test]
async fn escalation_attempts_are_refused_with_a_reason() {
    let api = Api::start().await;
    let cases = [
        (
            &api.vera,
            json!({"scopes": ["datasets:write"]}),
            "exceed the grants",
        ),
        (&api.vera, json!({"principal": "ada"}), "api_keys:manage"),
        (
            &api.ada_read_only,
            json!({"scopes": ["datasets:write"]}),
            "exceed the access",
        ),
        (
            &api.ada_read_only,
            json!({"principal": "ed"}),
            "api_keys:manage",
        ),
        (
            &api.vera,
            json!({"scopes": ["secrets:read"]}),
            "unknown resource",
        ),
    ];
    for (caller, body, reason) in cases {
        let resp = api.create(&caller.key, body.clone()).await;
        assert_eq!(resp.status, 403, "{body}: {}", resp.text());
        let detail = resp.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains(reason), "{body}: {detail}");
    }
    // A read-only key mints only read-only keys: without scopes it passes its own on.
    let secret = secret_of(&api.create(&api.ada_read_only.key, json!({})).await);
    assert_eq!(api.status("GET", "/v1/datasets", &secret).await, 200);
    assert_eq!(api.status("PUT", "/v1/datasets/d1", &secret).await, 403);
    let keys: serde_yaml::Value =
        serde_yaml::from_str(&api.proxy.workspace.read("keys.yaml")).unwrap();
    let owned_by_ada = keys["keys"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|k| k["principal"] == "ada")
        .count();
    assert_eq!(owned_by_ada, 3, "only the allowed create was written");
}

#[tokio::test]
async fn rotation_keeps_the_old_key_for_the_overlap_then_stops_it() {
    let api = Api::start().await;
    let old = secret_of(&api.create(&api.vera.key, json!({"purpose": "ci"})).await);
    let old_id = &old[4..12];
    let resp = api
        .call(
            "POST",
            &format!("{PREFIX}/{old_id}/rotate"),
            &api.vera.key,
            json!({"overlap": "2s"}),
        )
        .await;
    let new = secret_of(&resp);
    assert_eq!(resp.json()["purpose"], "ci");
    assert_ne!(new, old);
    assert_eq!(api.status("GET", "/v1/datasets", &new).await, 200);
    assert_eq!(
        api.status("GET", "/v1/datasets", &old).await,
        200,
        "overlap"
    );
    eventually(
        "the old key expires after the overlap",
        Duration::from_secs(10),
        || async { api.status("GET", "/v1/datasets", &old).await == 401 },
    )
    .await;
    assert_eq!(api.status("GET", "/v1/datasets", &new).await, 200);
    // A read-only key may not rotate into a key stronger than itself.
    let strong = secret_of(&api.create(&api.ada.key, json!({})).await);
    let resp = api
        .call(
            "POST",
            &format!("{PREFIX}/{}/rotate", &strong[4..12]),
            &api.ada_read_only.key,
            Value::Null,
        )
        .await;
    assert_eq!(resp.status, 403, "{}", resp.text());
}

#[tokio::test]
async fn deactivate_activate_and_revoke_apply_on_the_next_request() {
    let api = Api::start().await;
    let secret = secret_of(&api.create(&api.vera.key, json!({})).await);
    let id = &secret[4..12];
    let path = |action: &str| format!("{PREFIX}/{id}/{action}");
    let resp = api
        .call("POST", &path("deactivate"), &api.vera.key, Value::Null)
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["active"], false);
    assert_eq!(api.status("GET", "/v1/datasets", &secret).await, 401);
    assert_eq!(
        api.call("POST", &path("activate"), &api.vera.key, Value::Null)
            .await
            .status,
        200
    );
    assert_eq!(api.status("GET", "/v1/datasets", &secret).await, 200);
    let lou_try = api
        .call(
            "DELETE",
            &format!("{PREFIX}/{id}"),
            &api.lou.key,
            Value::Null,
        )
        .await;
    assert_eq!(lou_try.status, 404);
    let resp = api
        .call(
            "DELETE",
            &format!("{PREFIX}/{id}"),
            &api.vera.key,
            Value::Null,
        )
        .await;
    assert_eq!(resp.status, 204);
    assert_eq!(api.status("GET", "/v1/datasets", &secret).await, 401);
    assert!(!api.proxy.workspace.read("keys.yaml").contains(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_never_lose_a_key() {
    let api = Api::start().await;
    let creates = (0..16).map(|i| {
        let (addr, auth) = (api.proxy.addr, format!("Bearer {}", api.vera.key));
        tokio::spawn(async move {
            let body = json!({"purpose": format!("parallel {i}")}).to_string();
            send(addr, "POST", PREFIX, &[("authorization", &auth)], &body).await
        })
    });
    let mut secrets = Vec::new();
    for create in creates {
        secrets.push(secret_of(&create.await.unwrap()));
    }
    for secret in &secrets {
        assert_eq!(api.status("GET", "/v1/datasets", secret).await, 200);
    }
    let file = api.proxy.workspace.read("keys.yaml");
    for secret in &secrets {
        assert!(file.contains(&secret[4..12]), "key {} lost", &secret[4..12]);
    }
    let list = api
        .call("GET", PREFIX, &api.vera.key, Value::Null)
        .await
        .json();
    assert_eq!(list["keys"].as_array().unwrap().len(), 17);
}

#[tokio::test]
async fn the_prefix_needs_a_key_and_is_never_forwarded() {
    let api = Api::start().await;
    let resp = send(api.proxy.addr, "GET", PREFIX, &[], "").await;
    assert_eq!(resp.status, 401);
    let resp = api
        .call("GET", &format!("{PREFIX}/x/y/z"), &api.ada.key, Value::Null)
        .await;
    assert_eq!(resp.status, 404);
    let resp = api
        .call("POST", PREFIX, &api.vera.key, json!({"nonsense": 1}))
        .await;
    assert_eq!(resp.status, 400);
    let resp = api
        .call("GET", "/_portcullis/v1/keysx", &api.ada.key, Value::Null)
        .await;
    assert_eq!(
        resp.status, 403,
        "segment-aware prefix: this is an ordinary (unrouted) path"
    );
    assert_eq!(api.backend.count(), 0);
}

#[tokio::test]
async fn weak_keys_cannot_revive_or_extend_stronger_ones_and_absurd_times_are_refused() {
    let api = Api::start().await;
    let strong = secret_of(&api.create(&api.ada.key, json!({})).await);
    let id = &strong[4..12];
    let path = |action: &str| format!("{PREFIX}/{id}/{action}");
    assert_eq!(
        api.call("POST", &path("deactivate"), &api.ada.key, Value::Null)
            .await
            .status,
        200
    );
    let revive = api
        .call(
            "POST",
            &path("activate"),
            &api.ada_read_only.key,
            Value::Null,
        )
        .await;
    assert_eq!(revive.status, 403, "{}", revive.text());
    assert_eq!(api.status("GET", "/v1/datasets", &strong).await, 401);
    let far = api
        .create(&api.vera.key, json!({"expires": "600000y"}))
        .await;
    assert_eq!(far.status, 400, "{}", far.text());
    let own = secret_of(&api.create(&api.vera.key, json!({"expires": "1h"})).await);
    let long = api
        .call(
            "POST",
            &format!("{PREFIX}/{}/rotate", &own[4..12]),
            &api.vera.key,
            json!({"overlap": "1000y"}),
        )
        .await;
    assert_eq!(long.status, 400, "{}", long.text());
    let huge = "x".repeat(70 * 1024);
    let auth = format!("Bearer {}", api.vera.key);
    let body = format!("{{\"purpose\": \"{huge}\"}}");
    let r = send(
        api.proxy.addr,
        "POST",
        PREFIX,
        &[("authorization", &auth)],
        &body,
    )
    .await;
    assert_eq!(r.status, 413);
}

#[tokio::test]
async fn the_wildcard_resource_never_lets_an_editor_make_keys() {
    // `editor: ["*:read", "*:write"]` names no api_keys grant: `*` does not cover it.
    let backend = RecordingBackend::start().await;
    let ed = TestKey::new("ed");
    let proxy = Proxy::start(&backend.url(), POLICY_TEXT, &keys_yaml(&[&ed]), "").await;
    let auth = format!("Bearer {}", ed.key);
    let resp = send(
        proxy.addr,
        "POST",
        PREFIX,
        &[("authorization", &auth)],
        "{}",
    )
    .await;
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert!(resp.json()["detail"]
        .as_str()
        .unwrap()
        .contains("api_keys:write"));
    let list = send(proxy.addr, "GET", PREFIX, &[("authorization", &auth)], "").await;
    assert_eq!(list.status, 403);
    // ...while the same role still writes datasets.
    let put = send(
        proxy.addr,
        "PUT",
        "/v1/datasets/x",
        &[("authorization", &auth)],
        "{}",
    )
    .await;
    assert_eq!(put.status, 200);
    // And `check` says where the policy relied on the old reading, without failing.
    let ran = std::process::Command::new(BIN)
        .args(["check", "--policy"])
        .arg(proxy.workspace.path("policy.yaml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert!(ran.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("does not cover api_keys"),
        "{stderr}"
    );
}

#[tokio::test]
async fn hostile_text_is_refused_and_the_keys_file_stays_loadable() {
    let api = Api::start().await;
    let before = api.proxy.workspace.read("keys.yaml");
    for body in [
        json!({"purpose": "a\u{7f}b"}),
        json!({"purpose": "a\u{85}b"}),
        json!({"purpose": "line\nbreak"}),
        json!({"purpose": "\u{202e}txt.exe"}),
        json!({"purpose": "x".repeat(257)}),
        json!({"scopes": ["datasets/a\u{9f}:read"]}),
        json!({"scopes": vec!["datasets:read"; 33]}),
    ] {
        let resp = api.create(&api.vera.key, body.clone()).await;
        assert_eq!(resp.status, 400, "{body}: {}", resp.text());
    }
    assert_eq!(
        api.proxy.workspace.read("keys.yaml"),
        before,
        "nothing was written"
    );
    // Every later change still works, and so does `check`.
    let ok = api
        .create(&api.vera.key, json!({"purpose": "Café – 数据 \"quoted\""}))
        .await;
    assert_eq!(ok.status, 201, "{}", ok.text());
    let ran = std::process::Command::new(BIN)
        .args(["check", "--policy"])
        .arg(api.proxy.workspace.path("policy.yaml"))
        .arg("--keys")
        .arg(api.proxy.workspace.path("keys.yaml"))
        .output()
        .unwrap();
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
}

#[tokio::test]
async fn a_principal_cannot_hold_more_keys_than_the_quota() {
    let backend = RecordingBackend::start().await;
    let vera = TestKey::new("vera");
    let proxy = Proxy::start(
        &backend.url(),
        POLICY_TEXT,
        &keys_yaml(&[&vera]),
        "key_api:\n  max_keys_per_principal: 3\n",
    )
    .await;
    let auth = format!("Bearer {}", vera.key);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            send(
                proxy.addr,
                "POST",
                PREFIX,
                &[("authorization", &auth)],
                "{}",
            )
            .await
            .status,
        );
    }
    assert_eq!(statuses, vec![201, 201, 409, 409]);
}
