//! Per-key rate limits through the real binary: a key over its limit gets 429 with Retry-After
//! and the RateLimit header fields and never reaches the backend; other keys, refused requests
//! and unknown keys spend nothing of its budget.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;

const POLICY_TEXT: &str = r#"version: 1
limits:
  default: 5/m
routes:
  - match: GET /v1/datasets
    resource: datasets
    access: read
  - match: PUT /v1/datasets
    resource: datasets
    access: write
principals:
  victor: { kind: user, grants: ["datasets:read"] }
  vera: { kind: user, grants: ["datasets:read"] }
  etl-bot: { kind: robot, grants: ["datasets:read"], limit: 2/h }
"#;

async fn call(proxy: &Proxy, method: &str, key: &str) -> Resp {
    let auth = format!("Bearer {key}");
    send(
        proxy.addr,
        method,
        "/v1/datasets",
        &[("authorization", &auth)],
        "",
    )
    .await
}

#[tokio::test]
async fn a_key_over_its_limit_gets_429_and_nobody_else_pays_for_it() {
    let backend = RecordingBackend::start().await;
    let (victor, vera, robot) = (
        TestKey::new("victor"),
        TestKey::new("vera"),
        TestKey::new("etl-bot"),
    );
    let proxy = Proxy::start(
        &backend.url(),
        POLICY_TEXT,
        &keys_yaml(&[&victor, &vera, &robot]),
        "audit:\n  file: audit.jsonl\n",
    )
    .await;
    // Refused and unknown requests first: none of them may spend victor's budget.
    for _ in 0..20 {
        assert_eq!(call(&proxy, "PUT", &victor.key).await.status, 403);
        let forged = format!("pcs_{}", random_alnum(40));
        assert_eq!(call(&proxy, "GET", &forged).await.status, 401);
    }
    for i in 0..5 {
        let r = call(&proxy, "GET", &victor.key).await;
        assert_eq!(r.status, 200, "request {i}");
        let expected = format!("\"default\";r={};t=", 4 - i);
        assert!(
            r.header("ratelimit")
                .is_some_and(|v| v.starts_with(&expected)),
            "request {i}: {:?}",
            r.header("ratelimit")
        );
    }
    let before = backend.count();
    let r = call(&proxy, "GET", &victor.key).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=12).contains(&retry), "Retry-After {retry}");
    assert!(r
        .header("ratelimit")
        .is_some_and(|v| v.starts_with("\"default\";r=0;")));
    assert_eq!(
        backend.count(),
        before,
        "a limited request reached the backend"
    );
    // Another key of the same default limit is untouched.
    assert_eq!(call(&proxy, "GET", &vera.key).await.status, 200);
    // A principal's own limit replaces the default.
    assert_eq!(call(&proxy, "GET", &robot.key).await.status, 200);
    let r = call(&proxy, "GET", &robot.key).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("ratelimit")
        .is_some_and(|v| v.starts_with("\"default\";r=0;")));
    let r = call(&proxy, "GET", &robot.key).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("ratelimit-policy"), Some("\"default\";q=2;w=3600"));

    eventually("a rate_limited audit event", PATIENCE, || async {
        proxy
            .workspace
            .read("audit.jsonl")
            .lines()
            .any(|l| l.contains("\"reason\":\"rate_limited\"") && l.contains("\"status\":429"))
    })
    .await;
    let m = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        m.contains(
            "portcullis_rate_limited_total{principal_kind=\"user\",route=\"/v1/datasets\"} 1"
        ),
        "{m}"
    );
}

#[test]
fn check_reports_a_bad_limit_where_it_is() {
    let (code, stderr) = check_policy(
        "version: 1\nlimits:\n  default: fast\nroutes:\n  - match: GET /x\n    resource: x\n    access: read\nprincipals:\n  a: { kind: user, grants: ['x:read'], limit: 0/s }\n",
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("policy.yaml:3:12: \"fast\" is not a limit"),
        "{stderr}"
    );
    assert!(stderr.contains("\"0/s\" is not a limit"), "{stderr}");
}
