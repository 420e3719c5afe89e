//! Metrics and per-key usage through the real binary: after a known set of requests, `/metrics`
//! is parsed as Prometheus exposition text and `/keys` counts match the requests made per key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;

use prometheus_parse::{Sample, Scrape, Value};
use support::*;

async fn scrape(proxy: &Proxy) -> Scrape {
    let text = get(proxy.admin, "/metrics", &[]).await.text();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

fn value(sample: &Sample) -> f64 {
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
        Value::Summary(_) => 0.0,
    }
}

fn find(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(value)
        .sum()
}

#[tokio::test]
async fn requests_are_counted_by_decision_reason_resource_access_and_status() {
    let world = World::start_with("metrics:\n  per_key: true\n", &[]).await;
    let proxy = &world.proxy;
    for _ in 0..3 {
        assert_eq!(
            world
                .call("GET", "/v1/datasets/ds_1", Some(&world.viewer))
                .await
                .status,
            200
        );
    }
    assert_eq!(
        world
            .call("PUT", "/v1/datasets/ds_1", Some(&world.viewer))
            .await
            .status,
        403
    );
    assert_eq!(world.call("GET", "/v1/datasets", None).await.status, 401);
    assert_eq!(world.call("GET", "/status", None).await.status, 200);
    assert_eq!(
        world
            .call("GET", "/nowhere", Some(&world.editor))
            .await
            .status,
        403
    );

    let s = scrape(proxy).await;
    let granted = [
        ("decision", "allow"),
        ("reason", "granted"),
        ("resource", "datasets"),
        ("access", "read"),
        ("status", "200"),
    ];
    assert_eq!(find(&s, "portcullis_requests_total", &granted), 3.0);
    let forbidden = [
        ("decision", "deny"),
        ("reason", "forbidden"),
        ("resource", "datasets"),
        ("access", "write"),
        ("status", "403"),
    ];
    assert_eq!(find(&s, "portcullis_requests_total", &forbidden), 1.0);
    assert_eq!(
        find(
            &s,
            "portcullis_requests_total",
            &[("reason", "no_credential"), ("status", "401")]
        ),
        1.0
    );
    assert_eq!(
        find(
            &s,
            "portcullis_requests_total",
            &[("reason", "public"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        find(
            &s,
            "portcullis_requests_total",
            &[("reason", "no_route"), ("status", "403")]
        ),
        1.0
    );
    assert_eq!(find(&s, "portcullis_requests_total", &[]), 7.0);
    assert_eq!(
        find(&s, "portcullis_request_duration_seconds_count", &[]),
        7.0
    );
    assert_eq!(
        find(&s, "portcullis_upstream_duration_seconds_count", &[]),
        4.0
    );
    assert_eq!(find(&s, "portcullis_keys_loaded", &[]), 5.0);
    assert!(find(&s, "portcullis_policy_routes", &[]) >= 10.0);
    assert_eq!(find(&s, "portcullis_config_generation", &[]), 1.0);
    assert!(find(&s, "portcullis_last_reload_success_timestamp_seconds", &[]) > 1.7e9);
    assert_eq!(
        find(
            &s,
            "portcullis_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(
        find(
            &s,
            "portcullis_key_requests_total",
            &[("key_id", &world.viewer.id)]
        ),
        4.0
    );
    assert!(
        find(
            &s,
            "portcullis_key_last_used_timestamp_seconds",
            &[("key_id", &world.viewer.id)]
        ) > 1.7e9
    );
    // Bounded labels: no raw paths, never a key.
    let text = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(!text.contains("/nowhere") && !text.contains("ds_1"));
    for key in [&world.viewer, &world.editor] {
        assert!(!text.contains(&key.key));
    }
}

#[tokio::test]
async fn per_key_series_are_off_by_default() {
    let world = World::start().await;
    world.call("GET", "/v1/datasets", Some(&world.viewer)).await;
    let s = scrape(&world.proxy).await;
    assert!(!s
        .samples
        .iter()
        .any(|x| x.metric == "portcullis_key_requests_total"));
    // The audit families exist even without an audit sink, so dashboards find them.
    assert!(s
        .samples
        .iter()
        .any(|x| x.metric == "portcullis_audit_queue_depth"));
    assert_eq!(
        find(&s, "portcullis_requests_total", &[("reason", "granted")]),
        1.0
    );
}

#[tokio::test]
async fn keys_endpoint_counts_each_keys_requests_without_secrets() {
    let world = World::start().await;
    for _ in 0..2 {
        world.call("GET", "/v1/jobs", Some(&world.editor)).await;
    }
    world
        .call("PUT", "/v1/datasets/x", Some(&world.viewer))
        .await; // denied, still a use
    let answer = get(world.proxy.admin, "/keys", &[]).await;
    assert_eq!(answer.status, 200);
    let json = answer.json();
    let by_id: HashMap<String, &serde_json::Value> = json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["id"].as_str().unwrap().to_string(), k))
        .collect();
    assert_eq!(by_id[&world.editor.id]["calls"], 2);
    assert_eq!(by_id[&world.viewer.id]["calls"], 1);
    assert_eq!(by_id[&world.robot.id]["calls"], 0);
    assert!(by_id[&world.robot.id]["last_used"].is_null());
    assert!(by_id[&world.editor.id]["last_used"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(
        by_id[&world.editor.id]["prefix"],
        format!("{}***", world.editor.prefix())
    );
    let text = answer.text();
    for key in [&world.editor, &world.viewer, &world.robot] {
        assert!(!text.contains(&key.key) && !text.contains(&key.hash()[7..]));
    }

    // Counts survive a reload of the keys file.
    let keys_path = world.proxy.workspace.path("keys.yaml");
    let mut keys = std::fs::read_to_string(&keys_path).unwrap();
    keys.push_str("# touched\n");
    std::fs::write(&keys_path, keys).unwrap();
    eventually("the keys file reloads", PATIENCE, || async {
        get(world.proxy.admin, "/readyz", &[])
            .await
            .text()
            .contains("generation=2")
    })
    .await;
    let json = get(world.proxy.admin, "/keys", &[]).await.json();
    let editor = json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == world.editor.id.as_str())
        .unwrap()
        .clone();
    assert_eq!(editor["calls"], 2);

    // The CLI merges the same counts into its table.
    let out = std::process::Command::new(BIN)
        .args(["keys", "list", "--keys"])
        .arg(&keys_path)
        .args(["--admin", &format!("http://{}", world.proxy.admin)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.lines().next().unwrap().contains("CALLS"));
    let row = table
        .lines()
        .find(|l| l.starts_with(&world.editor.id))
        .unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert!(cells.contains(&"2"), "{row}");
}

#[tokio::test]
async fn every_family_is_there_from_the_start_and_one_bad_edit_counts_once() {
    let world = World::start().await;
    let proxy = &world.proxy;
    let m = scrape(proxy).await;
    let has = |m: &Scrape, name: &str, labels: &[(&str, &str)]| {
        m.samples
            .iter()
            .any(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
    };
    for file in ["policy", "keys"] {
        for result in ["ok", "error"] {
            assert!(
                has(
                    &m,
                    "portcullis_reloads_total",
                    &[("file", file), ("result", result)]
                ),
                "portcullis_reloads_total{{file={file},result={result}}} missing before any reload"
            );
        }
    }
    // No syslog sink configured: no connection gauge that would read as an outage.
    assert!(!has(&m, "portcullis_audit_syslog_connected", &[]));

    // One bad save (an editor may fire several change events for it) counts, and logs, once.
    let policy = proxy.workspace.path("policy.yaml");
    let good = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(&policy, format!("{good}\nroutes: [oops\n")).unwrap();
    let errors = |m: &Scrape| {
        find(
            m,
            "portcullis_reloads_total",
            &[("file", "policy"), ("result", "error")],
        )
    };
    let mut seen = 0.0;
    for _ in 0..50 {
        seen = errors(&scrape(proxy).await);
        if seen > 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen, 1.0, "the bad edit was not counted");
    // Touch it again with the same bad text: still one.
    std::fs::write(&policy, format!("{good}\nroutes: [oops\n")).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(errors(&scrape(proxy).await), 1.0);
    let stderr = proxy.stderr();
    let logged = stderr
        .lines()
        .filter(|l| l.contains("reload rejected"))
        .count();
    assert!(logged >= 1, "{stderr}");
    let distinct: std::collections::HashSet<&str> = stderr
        .lines()
        .filter(|l| l.contains("reload rejected"))
        .map(|l| l.split("reload rejected").nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        distinct.len(),
        logged,
        "a rejection was logged twice:\n{stderr}"
    );
}
