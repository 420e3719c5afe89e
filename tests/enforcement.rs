//! The decision table of SPEC.md, driven through the real binary in front of a recording
//! backend: credentials, instance grants, access levels, key scopes, template priority,
//! denial bodies, the headers the backend receives, and the 431/502/504 edges.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use support::*;

/// Everything a denial body must not reveal about `key`.
fn secrets_of(key: &TestKey) -> Vec<String> {
    vec![
        key.key.clone(),
        key.id.clone(),
        key.principal.clone(),
        key.hash()[7..].to_string(),
        "*:read".into(),
    ]
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn basic(user: &str, key: &TestKey) -> String {
    let raw = format!("{user}:{}", key.key);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

#[tokio::test]
async fn public_route_passes_the_backend_status_without_a_key() {
    let w = World::start().await;
    let r = w.call("GET", "/status?status=418", None).await;
    assert_eq!(r.status, 418, "{}", r.text());
    assert!(r.header("x-request-id").is_some_and(|v| !v.is_empty()));
    assert_eq!(w.backend.single().target, "/status?status=418");

    // A key the proxy does not know changes nothing on a public route.
    let stranger = TestKey::new("alice");
    let auth = format!("Bearer {}", stranger.key);
    let r = get(w.proxy.addr, "/status", &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(w.backend.count(), 2);
}

#[tokio::test]
async fn missing_unknown_inactive_and_expired_keys_get_401() {
    let inactive = TestKey::new("alice").inactive();
    let expired = TestKey::new("alice").expires("2020-01-01T00:00:00Z");
    let unknown = TestKey::new("alice");
    let w = World::start_with("", &[&inactive, &expired]).await;

    let bearer = |k: &TestKey| format!("Bearer {}", k.key);
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("no credential", vec![]),
        ("unknown key", vec![("authorization", bearer(&unknown))]),
        (
            "malformed key",
            vec![("authorization", "Bearer not-a-key".into())],
        ),
        ("inactive key", vec![("x-api-key", inactive.key.clone())]),
        ("expired key", vec![("authorization", bearer(&expired))]),
        ("empty bearer", vec![("authorization", "Bearer ".into())]),
    ];
    let mut secrets = secrets_of(&inactive);
    secrets.extend(secrets_of(&expired));
    secrets.extend(secrets_of(&unknown));
    for path in ["/v1/datasets", "/v1/no-such-route"] {
        for (label, headers) in &cases {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let r = get(w.proxy.addr, path, &headers).await;
            assert_eq!(r.status, 401, "{label} on {path}: {}", r.text());
            assert_problem(&r, 401, &as_strs(&secrets));
            let challenge = r
                .header("www-authenticate")
                .unwrap_or_else(|| panic!("{label}: no WWW-Authenticate"));
            assert!(
                challenge.starts_with("Bearer"),
                "{label}: WWW-Authenticate {challenge:?}"
            );
        }
    }
    assert_eq!(
        w.backend.count(),
        0,
        "backend saw {:?}",
        w.backend.targets()
    );
}

#[tokio::test]
async fn a_key_expiring_in_the_future_is_valid() {
    let later = TestKey::new("victor").expires("2099-01-01T00:00:00Z");
    let w = World::start_with("", &[&later]).await;
    assert_eq!(
        w.call("GET", "/v1/datasets/ds_1", Some(&later))
            .await
            .status,
        200
    );
    assert_eq!(
        w.backend.single().header("x-portcullis-key-id"),
        Some(later.id.as_str())
    );
}

#[tokio::test]
async fn a_minimal_key_entry_is_active_by_default() {
    let backend = RecordingBackend::start().await;
    let k = TestKey::new("victor");
    let keys = format!(
        "version: 1\nkeys:\n  - id: \"{}\"\n    prefix: \"{}\"\n    hash: \"{}\"\n    principal: victor\n",
        k.id,
        k.prefix(),
        k.hash()
    );
    let proxy = Proxy::start(&backend.url(), POLICY, &keys, "").await;
    let auth = format!("Bearer {}", k.key);
    let r = get(proxy.addr, "/v1/datasets", &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        backend.single().header("x-portcullis-key-id"),
        Some(k.id.as_str())
    );
}

#[tokio::test]
async fn every_credential_form_works_and_none_reaches_the_backend() {
    let w = World::start().await;
    let v = &w.viewer;
    let forms: Vec<(&str, String)> = vec![
        ("authorization", format!("Bearer {}", v.key)),
        ("x-api-key", v.key.clone()),
        ("authorization", basic("anyone", v)),
        ("authorization", basic("", v)),
    ];
    for (name, value) in &forms {
        let r = get(w.proxy.addr, "/v1/datasets/ds_1", &[(name, value)]).await;
        assert_eq!(r.status, 200, "{name}: {value}: {}", r.text());
    }
    let seen = w.backend.requests();
    assert_eq!(seen.len(), forms.len());
    for req in seen {
        assert!(
            req.header("authorization").is_none(),
            "credential forwarded: {:?}",
            req.headers
        );
        assert!(
            req.header("x-api-key").is_none(),
            "credential forwarded: {:?}",
            req.headers
        );
        assert!(
            !format!("{:?}", req.headers).contains(&v.key),
            "key leaked to backend"
        );
        assert_eq!(req.header("x-portcullis-key-id"), Some(v.id.as_str()));
    }
}

#[tokio::test]
async fn two_different_credentials_are_refused_but_the_same_one_twice_is_fine() {
    let w = World::start().await;
    let (v, e) = (&w.viewer, &w.editor);
    let bearer_v = format!("Bearer {}", v.key);
    let mixed: Vec<Vec<(&str, String)>> = vec![
        vec![
            ("authorization", bearer_v.clone()),
            ("x-api-key", e.key.clone()),
        ],
        vec![
            ("x-api-key", v.key.clone()),
            ("authorization", basic("u", e)),
        ],
        vec![("x-api-key", e.key.clone()), ("x-api-key", v.key.clone())],
    ];
    for headers in &mixed {
        let headers: Vec<(&str, &str)> =
            headers.iter().map(|(n, val)| (*n, val.as_str())).collect();
        let r = get(w.proxy.addr, "/v1/datasets/ds_1", &headers).await;
        assert_eq!(
            r.status,
            401,
            "mixed credentials {:?}: {}",
            headers.iter().map(|h| h.0).collect::<Vec<_>>(),
            r.text()
        );
        let mut secrets = secrets_of(v);
        secrets.extend(secrets_of(e));
        assert_problem(&r, 401, &as_strs(&secrets));
    }
    assert_eq!(
        w.backend.count(),
        0,
        "backend saw {:?}",
        w.backend.targets()
    );

    let r = get(
        w.proxy.addr,
        "/v1/datasets/ds_1",
        &[("authorization", &bearer_v), ("x-api-key", &v.key)],
    )
    .await;
    assert_eq!(r.status, 200, "same key twice: {}", r.text());
    assert_eq!(w.backend.count(), 1);
}

#[tokio::test]
async fn a_valid_key_without_the_grant_gets_403_problem_json() {
    let w = World::start().await;
    for (method, path) in [
        ("PUT", "/v1/datasets/ds_1"),
        ("POST", "/v1/admin/users"),
        ("POST", "/v1/datasets"),
    ] {
        let r = w.call(method, path, Some(&w.viewer)).await;
        assert_problem(&r, 403, &as_strs(&secrets_of(&w.viewer)));
        assert!(
            !r.text().contains("editor") && !r.text().contains("viewer"),
            "role names leaked: {}",
            r.text()
        );
    }
    assert_eq!(
        w.backend.count(),
        0,
        "backend saw {:?}",
        w.backend.targets()
    );
}

#[tokio::test]
async fn a_valid_key_without_a_route_is_denied_by_default() {
    let w = World::start().await;
    for (method, path) in [
        ("GET", "/v1/no-such-route"),
        ("DELETE", "/status"),
        ("GET", "/"),
    ] {
        let r = w.call(method, path, Some(&w.editor)).await;
        assert_problem(&r, 403, &as_strs(&secrets_of(&w.editor)));
    }
    // Without a key the same requests are 401, not 403: nothing is revealed about routes.
    let r = w.call("DELETE", "/status", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        w.backend.count(),
        0,
        "backend saw {:?}",
        w.backend.targets()
    );
}

#[tokio::test]
async fn deny_status_401_replaces_403_for_valid_keys() {
    let w = World::start_with("deny_status: 401\n", &[]).await;
    let r = w.call("PUT", "/v1/datasets/ds_1", Some(&w.viewer)).await;
    assert_problem(&r, 401, &as_strs(&secrets_of(&w.viewer)));
    let r = w.call("GET", "/v1/no-such-route", Some(&w.viewer)).await;
    assert_problem(&r, 401, &as_strs(&secrets_of(&w.viewer)));
    assert_eq!(w.backend.count(), 0);
    assert_eq!(
        w.call("GET", "/v1/datasets/ds_1", Some(&w.viewer))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn instance_grants_apply_only_to_their_instance() {
    let w = World::start().await;
    let bot = Some(&w.robot);
    let expect = [
        ("PUT", "/v1/datasets/ds_1", 200),
        ("GET", "/v1/datasets/ds_1", 200), // write includes read
        ("DELETE", "/v1/datasets/ds_1", 200),
        ("PUT", "/v1/datasets/ds_2", 403),
        ("GET", "/v1/datasets/ds_2", 403),
        ("GET", "/v1/datasets", 403), // an instance grant does not cover the list
        ("POST", "/v1/datasets", 403),
        ("GET", "/v1/jobs", 200),
        ("POST", "/v1/jobs/j1/cancel", 403),
    ];
    for (method, path, status) in expect {
        let r = w.call(method, path, bot).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
    }
    let seen: Vec<String> = w
        .backend
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.target))
        .collect();
    assert_eq!(
        seen,
        [
            "PUT /v1/datasets/ds_1",
            "GET /v1/datasets/ds_1",
            "DELETE /v1/datasets/ds_1",
            "GET /v1/jobs"
        ]
    );
}

#[tokio::test]
async fn access_levels_nest_read_write_manage() {
    let w = World::start().await;
    let expect = [
        (&w.ops, "POST", "/v1/admin/users", 200), // manage includes write
        (&w.ops, "GET", "/v1/admin/users", 200),
        (&w.ops, "GET", "/v1/datasets", 403),
        (&w.viewer, "GET", "/v1/admin/users", 403), // read does not include write
        (&w.viewer, "GET", "/v1/datasets", 200),
        (&w.editor, "POST", "/v1/datasets", 200),
        (&w.editor, "GET", "/v1/admin/users", 200),
    ];
    for (key, method, path, status) in expect {
        let r = w.call(method, path, Some(key)).await;
        assert_eq!(
            r.status,
            status,
            "{} {method} {path}: {}",
            key.principal,
            r.text()
        );
    }
    assert_eq!(w.backend.count(), 5);
}

#[tokio::test]
async fn key_scopes_narrow_and_never_widen() {
    let alice_read = TestKey::new("alice").scopes(&["datasets:read"]);
    let alice_ds1 = TestKey::new("alice").scopes(&["datasets/ds_1:write"]);
    let victor_all = TestKey::new("victor").scopes(&["*:*"]);
    let bot_wide = TestKey::new("etl-bot").scopes(&["datasets:write"]);
    let w = World::start_with("", &[&alice_read, &alice_ds1, &victor_all, &bot_wide]).await;
    let expect = [
        (&alice_read, "GET", "/v1/datasets/ds_1", 200),
        (&alice_read, "PUT", "/v1/datasets/ds_1", 403),
        (&alice_read, "GET", "/v1/jobs", 403),
        (&alice_ds1, "PUT", "/v1/datasets/ds_1", 200),
        (&alice_ds1, "GET", "/v1/datasets/ds_1", 200),
        (&alice_ds1, "PUT", "/v1/datasets/ds_2", 403),
        (&alice_ds1, "GET", "/v1/datasets", 403),
        (&victor_all, "GET", "/v1/datasets/ds_1", 200),
        (&victor_all, "PUT", "/v1/datasets/ds_1", 403), // a key never exceeds its principal
        (&victor_all, "POST", "/v1/admin/x", 403),
        (&bot_wide, "PUT", "/v1/datasets/ds_1", 200),
        (&bot_wide, "PUT", "/v1/datasets/ds_2", 403),
        (&bot_wide, "GET", "/v1/jobs", 403),
    ];
    for (key, method, path, status) in expect {
        let r = w.call(method, path, Some(key)).await;
        assert_eq!(
            r.status,
            status,
            "{} scopes {:?}: {method} {path}: {}",
            key.principal,
            key.scopes,
            r.text()
        );
    }
    assert_eq!(
        w.backend.count(),
        5,
        "backend saw {:?}",
        w.backend.targets()
    );
}

#[tokio::test]
async fn static_segment_beats_parameter() {
    let w = World::start().await;
    assert_eq!(
        w.call("GET", "/v1/datasets/export", Some(&w.exporter))
            .await
            .status,
        200
    );
    assert_eq!(
        w.call("GET", "/v1/datasets/ds_1", Some(&w.exporter))
            .await
            .status,
        403
    );
    assert_eq!(
        w.call("GET", "/v1/datasets/export", Some(&w.robot))
            .await
            .status,
        403
    );
    assert_eq!(w.backend.targets(), ["/v1/datasets/export"]);
}

#[tokio::test]
async fn most_specific_template_wins() {
    let policy = r#"version: 1
routes:
  - match: GET /v1/things/{*rest}
    resource: deep
    access: read
  - match: GET /v1/things/{thing}
    resource: things
    instance: thing
    access: read
  - match: GET /v1/things/special
    resource: special
    access: read
roles: {}
principals:
  dora: { kind: user, grants: ["deep:read"] }
  tim: { kind: user, grants: ["things:read"] }
  sam: { kind: user, grants: ["special:read"] }
"#;
    let backend = RecordingBackend::start().await;
    let (d, t, s) = (
        TestKey::new("dora"),
        TestKey::new("tim"),
        TestKey::new("sam"),
    );
    let proxy = Proxy::start(&backend.url(), policy, &keys_yaml(&[&d, &t, &s]), "").await;
    let expect = [
        (&d, "/v1/things/a/b", 200),
        (&d, "/v1/things/a", 403), // parameter beats catch-all
        (&d, "/v1/things/special", 403),
        (&t, "/v1/things/a", 200),
        (&t, "/v1/things/special", 403), // static beats parameter
        (&t, "/v1/things/a/b", 403),
        (&s, "/v1/things/special", 200),
        (&s, "/v1/things/a", 403),
    ];
    for (key, path, status) in expect {
        let auth = format!("Bearer {}", key.key);
        let r = get(proxy.addr, path, &[("authorization", &auth)]).await;
        assert_eq!(
            r.status,
            status,
            "{} GET {path}: {}",
            key.principal,
            r.text()
        );
    }
    assert_eq!(
        backend.targets(),
        ["/v1/things/a/b", "/v1/things/a", "/v1/things/special"]
    );
}

#[tokio::test]
async fn head_matches_get_routes() {
    let w = World::start().await;
    let r = w.call("HEAD", "/v1/datasets/ds_1", Some(&w.viewer)).await;
    assert_eq!(r.status, 200);
    assert_eq!(w.backend.single().method, "HEAD");
    // A route with only POST does not answer HEAD, even for a key that may write.
    let r = w.call("HEAD", "/v1/jobs/j1/cancel", Some(&w.editor)).await;
    assert_eq!(r.status, 403);
    assert_eq!(w.backend.count(), 1);
}

#[tokio::test]
async fn the_query_string_never_affects_the_decision() {
    let w = World::start().await;
    let r = w
        .call(
            "GET",
            "/v1/admin/x?next=/v1/public/y&public=true",
            Some(&w.viewer),
        )
        .await;
    assert_eq!(r.status, 403);
    let r = w
        .call(
            "GET",
            "/v1/admin/x?/../../v1/datasets/ds_1",
            Some(&w.viewer),
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(w.backend.count(), 0);

    let target = "/v1/datasets/ds_1?redirect=/../admin&x=%2F%zz&y=%61";
    let r = w.call("GET", target, Some(&w.viewer)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        w.backend.single().target,
        target,
        "query must be forwarded unchanged"
    );
}

#[tokio::test]
async fn the_backend_learns_who_called_and_from_where() {
    let w = World::start().await;
    let r = w.call("GET", "/v1/datasets/ds_1", Some(&w.viewer)).await;
    assert_eq!(r.status, 200);
    let seen = w.backend.single();
    assert_eq!(seen.header("x-portcullis-principal"), Some("victor"));
    assert_eq!(seen.header("x-portcullis-principal-kind"), Some("user"));
    assert_eq!(
        seen.header("x-portcullis-key-id"),
        Some(w.viewer.id.as_str())
    );
    let rid = r.header("x-request-id").expect("response X-Request-Id");
    assert_eq!(
        seen.header("x-request-id"),
        Some(rid),
        "backend and client see one request id"
    );
    let xff = seen.header("x-forwarded-for").expect("X-Forwarded-For");
    assert!(xff.contains("127.0.0.1"), "X-Forwarded-For {xff:?}");
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    let fwd = seen.header("forwarded").expect("Forwarded");
    assert!(
        fwd.contains("127.0.0.1") && fwd.to_ascii_lowercase().contains("proto=http"),
        "Forwarded {fwd:?}"
    );

    let r = w.call("GET", "/v1/jobs", Some(&w.robot)).await;
    assert_eq!(r.status, 200);
    let seen = w.backend.requests().pop().unwrap();
    assert_eq!(seen.header("x-portcullis-principal"), Some("etl-bot"));
    assert_eq!(seen.header("x-portcullis-principal-kind"), Some("robot"));
    assert_eq!(
        seen.header("x-portcullis-key-id"),
        Some(w.robot.id.as_str())
    );
}

#[tokio::test]
async fn client_sent_portcullis_headers_are_removed() {
    let w = World::start().await;
    let forged = [
        ("x-portcullis-principal", "root"),
        ("x-portcullis-principal-kind", "robot"),
        ("x-portcullis-key-id", "forged00"),
        ("x-portcullis-anything", "x"),
        ("X-Portcullis-Principal", "root2"),
        ("x-portcullis_principal", "cgi-root"),
        ("x_portcullis_key_id", "cgi-forged"),
    ];
    let r = get(w.proxy.addr, "/status", &forged).await;
    assert_eq!(r.status, 200);
    let seen = w.backend.single();
    let leaked: Vec<_> = seen
        .headers
        .keys()
        .filter(|n| n.as_str().replace('_', "-").starts_with("x-portcullis-"))
        .collect();
    assert!(
        leaked.is_empty(),
        "public route forwarded forged headers {leaked:?}"
    );

    let auth = format!("Bearer {}", w.viewer.key);
    let mut headers = forged.to_vec();
    headers.push(("authorization", &auth));
    assert_eq!(
        get(w.proxy.addr, "/v1/datasets/ds_1", &headers)
            .await
            .status,
        200
    );
    let seen = w.backend.requests().pop().unwrap();
    let values = |n: &str| {
        seen.headers
            .get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(values("x-portcullis-principal"), ["victor"]);
    assert_eq!(values("x-portcullis-principal-kind"), ["user"]);
    assert_eq!(values("x-portcullis-key-id"), [w.viewer.id.as_str()]);
    assert!(values("x-portcullis-anything").is_empty());
}

#[tokio::test]
async fn client_forwarding_headers_are_replaced_not_trusted() {
    let w = World::start().await;
    let planted = [
        ("x-forwarded-for", "10.9.9.9"),
        ("forwarded", "for=10.9.9.9"),
        ("x-forwarded-host", "evil.example"),
        ("host", "api.example"),
    ];
    assert_eq!(get(w.proxy.addr, "/status", &planted).await.status, 200);
    let seen = w.backend.single();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("forwarded"), Some("for=127.0.0.1;proto=http"));
    assert_eq!(seen.header("x-forwarded-host"), None);
    assert_eq!(seen.header("host"), Some("api.example"));
}

#[tokio::test]
async fn a_static_segment_before_a_catch_all_beats_parameters() {
    // /v1/admin/{*rest} needs admin:write; /v1/{x}/{y} would be readable by every viewer.
    let policy = POLICY.replacen(
        "roles:",
        "  - match: GET /v1/{area}/{item}\n    resource: datasets\n    access: read\nroles:",
        1,
    );
    let backend = RecordingBackend::start().await;
    let viewer = TestKey::new("victor");
    let ops = TestKey::new("ops");
    let proxy = Proxy::start(&backend.url(), &policy, &keys_yaml(&[&viewer, &ops]), "").await;
    let call = |key: &TestKey, path: &str| {
        let auth = format!("Bearer {}", key.key);
        let addr = proxy.addr;
        let path = path.to_string();
        async move { get(addr, &path, &[("authorization", &auth)]).await.status }
    };
    assert_eq!(call(&viewer, "/v1/admin/users").await, 403);
    assert_eq!(call(&ops, "/v1/admin/users").await, 200);
    assert_eq!(call(&viewer, "/v1/reports/q3").await, 200);
}

#[tokio::test]
async fn a_sane_request_id_is_kept_and_an_insane_one_replaced() {
    let w = World::start().await;
    let r = get(w.proxy.addr, "/status", &[("x-request-id", "abc-123")]).await;
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    assert_eq!(w.backend.single().header("x-request-id"), Some("abc-123"));

    let long = "a".repeat(300);
    for insane in [long.as_str(), "has spaces in it"] {
        let r = get(w.proxy.addr, "/status", &[("x-request-id", insane)]).await;
        let got = r.header("x-request-id").expect("X-Request-Id").to_string();
        assert!(
            !got.is_empty() && got != insane,
            "insane request id {insane:?} kept"
        );
        let seen = w.backend.requests().pop().unwrap();
        assert_eq!(
            seen.header("x-request-id"),
            Some(got.as_str()),
            "backend got another id"
        );
    }
    // Denials carry one too (assert_problem checks it matches the body).
    let r = w.call("GET", "/v1/datasets", None).await;
    assert_problem(&r, 401, &[]);
}

#[tokio::test]
async fn an_unnormalisable_path_is_400_before_any_key_check() {
    let w = World::start().await;
    for path in ["/v1/datasets/a%2Fb", "/v1/public/%zz", "/v1/public/a%00b"] {
        for key in [None, Some(&w.viewer)] {
            let r = w.call("GET", path, key).await;
            assert_eq!(r.status, 400, "{path}: {}", r.text());
            assert!(
                r.header("x-request-id").is_some(),
                "400 without X-Request-Id"
            );
        }
    }
    assert_eq!(
        w.backend.count(),
        0,
        "backend saw {:?}",
        w.backend.targets()
    );
}

#[tokio::test]
async fn an_oversized_header_is_431() {
    let w = World::start().await;
    let mut req = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 100 * 1024));
    req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let reply = w.raw(&req).await;
    assert_eq!(
        reply.status(),
        431,
        "got {}",
        String::from_utf8_lossy(&reply.bytes)
    );
    assert_eq!(w.backend.count(), 0);
}

#[tokio::test]
async fn an_unreachable_backend_is_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let viewer = TestKey::new("victor");
    let upstream = format!("http://{closed}");
    let proxy = Proxy::start(
        &upstream,
        POLICY,
        &keys_yaml(&[&viewer]),
        "upstream_connect_timeout: \"2s\"\n",
    )
    .await;
    let r = get(proxy.addr, "/status", &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.header("x-request-id").is_some());
    let auth = format!("Bearer {}", viewer.key);
    let r = get(proxy.addr, "/v1/datasets/ds_1", &[("authorization", &auth)]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(!r.text().contains(&viewer.key));
}

#[tokio::test]
async fn a_backend_slower_than_upstream_timeout_is_504() {
    let w = World::start_with("upstream_timeout: \"1s\"\n", &[]).await;
    let started = Instant::now();
    let r = w.call("GET", "/slow", None).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "504 took {:?}",
        started.elapsed()
    );
    assert!(r.header("x-request-id").is_some());
    assert_eq!(w.backend.single().target, "/slow");
}
