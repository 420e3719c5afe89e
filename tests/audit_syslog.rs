//! Interop tests of the audit stream against a real rsyslog: TCP, TLS (CA and mutual), UDP,
//! an outage, a receiver crash, a portcullis restart, the wire format (parsed with
//! `syslog_loose`) and the absence of any plaintext key. Each test owns its rsyslog, ports
//! and temp dirs. They fail, not skip, when `rsyslogd` is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use audit_support::{eventually, ids, within, Certs, Listen, Received, Rsyslog};
use portcullis::audit::{
    AuditConfig, AuditEvent, Auditor, DecisionEvent, SyslogConfig, FIELD_NAMES,
};
use prometheus::Registry;

const HOST: &str = "audit-test-host";

fn syslog(url: &str, spool: &Path) -> SyslogConfig {
    SyslogConfig {
        url: url.to_owned(),
        spool_dir: Some(spool.to_owned()),
        hostname: Some(HOST.to_owned()),
        backoff_max: Some("300ms".to_owned()),
        ..SyslogConfig::default()
    }
}

fn config(syslog: SyslogConfig) -> AuditConfig {
    AuditConfig {
        syslog: Some(syslog),
        ..AuditConfig::default()
    }
}

fn decision(n: u64) -> AuditEvent {
    let allow = !n.is_multiple_of(3);
    AuditEvent::Decision(DecisionEvent {
        request_id: format!("req-{n}"),
        allow,
        reason: if allow { "granted" } else { "forbidden" },
        status: if allow { 200 } else { 403 },
        method: "GET".into(),
        path: format!("/v1/datasets/ds_{n}"),
        route: Some("/v1/datasets/{dataset}".into()),
        resource: Some("datasets".into()),
        instance: Some(format!("ds_{n}")),
        access: Some("read"),
        key_id: Some("k7Hq2mZ9".into()),
        key_prefix: Some("pcs_k7Hq2m".into()),
        principal: Some("alice".into()),
        principal_kind: Some("user"),
        credential: Some("key"),
        issuer: None,
        client_id: None,
        filtered: None,
        filter_error: None,
        shadow_decision: None,
        shadow_reason: None,
        client_ip: "127.0.0.1".into(),
        user_agent: Some("audit-test/1".into()),
        upstream_status: allow.then_some(200),
        duration_us: 100 + n,
    })
}

/// The value of one sample in the registry's text exposition.
fn metric(registry: &Registry, series: &str) -> u64 {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}

const SENT: &str = r#"portcullis_audit_events_total{result="sent",sink="syslog"}"#;
const SPOOLED: &str = r#"portcullis_audit_events_total{result="spooled",sink="syslog"}"#;
const DROPPED: &str = r#"portcullis_audit_events_total{result="dropped",sink="syslog"}"#;

/// The sequence numbers of this boot's messages, in arrival order.
fn seqs_of(lines: &[String], boot: &str) -> Vec<u64> {
    ids(lines)
        .into_iter()
        .filter(|(b, _)| b == boot)
        .map(|(_, s)| s)
        .collect()
}

#[tokio::test]
async fn tcp_delivers_every_event_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(&dir.path().join("rsyslog"), Listen::Tcp).await;
    let registry = Registry::new();
    let a = Auditor::start(
        &config(syslog(&rsyslog.url(), &dir.path().join("spool"))),
        &registry,
    )
    .unwrap();
    for n in 1..=500 {
        a.record(decision(n));
    }
    let lines = rsyslog.wait_for(500).await;
    let boot = a.boot_id().unwrap().to_owned();
    assert_eq!(seqs_of(&lines, &boot), (1..=500).collect::<Vec<_>>());
    eventually("sent counter", || {
        (metric(&registry, SENT) == 500).then_some(())
    })
    .await;
    assert_eq!(metric(&registry, SPOOLED), 500);
    assert_eq!(metric(&registry, DROPPED), 0);
    within("shutdown", a.shutdown(Duration::from_secs(5))).await;
}

#[tokio::test]
async fn tls_delivers_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let listen = Listen::Tls {
        certs: certs.clone(),
        driver: "gtls",
        mutual: false,
    };
    let rsyslog = Rsyslog::start(&dir.path().join("rsyslog"), listen).await;
    let mut s = syslog(&rsyslog.url(), &dir.path().join("spool"));
    s.ca = Some(certs.ca.clone());
    let a = Auditor::start(&config(s), &Registry::new()).unwrap();
    for n in 1..=50 {
        a.record(decision(n));
    }
    let lines = rsyslog.wait_for(50).await;
    assert_eq!(
        seqs_of(&lines, a.boot_id().unwrap()),
        (1..=50).collect::<Vec<_>>()
    );
    within("shutdown", a.shutdown(Duration::from_secs(5))).await;
}

#[tokio::test]
async fn tls_mutual_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let listen = Listen::Tls {
        certs: certs.clone(),
        driver: "ossl",
        mutual: true,
    };
    let rsyslog = Rsyslog::start(&dir.path().join("rsyslog"), listen).await;
    let mut s = syslog(&rsyslog.url(), &dir.path().join("spool"));
    s.ca = Some(certs.ca.clone());
    s.client_cert = Some(certs.client_cert.clone());
    s.client_key = Some(certs.client_key.clone());
    let a = Auditor::start(&config(s), &Registry::new()).unwrap();
    for n in 1..=20 {
        a.record(decision(n));
    }
    let lines = rsyslog.wait_for(20).await;
    assert_eq!(
        seqs_of(&lines, a.boot_id().unwrap()),
        (1..=20).collect::<Vec<_>>()
    );
    within("shutdown", a.shutdown(Duration::from_secs(5))).await;
}

#[tokio::test]
async fn tls_refuses_a_server_signed_by_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let other = Certs::generate(&dir.path().join("other-certs"));
    let listen = Listen::Tls {
        certs,
        driver: "gtls",
        mutual: false,
    };
    let rsyslog = Rsyslog::start(&dir.path().join("rsyslog"), listen).await;
    let mut s = syslog(&rsyslog.url(), &dir.path().join("spool"));
    s.ca = Some(other.ca.clone());
    let registry = Registry::new();
    let a = Auditor::start(&config(s), &registry).unwrap();
    a.record(decision(1));
    eventually("failed connection attempts", || {
        (metric(&registry, "portcullis_audit_reconnects_total") >= 2).then_some(())
    })
    .await;
    assert!(rsyslog.messages().is_empty());
    assert_eq!(metric(&registry, SENT), 0);
    assert_eq!(
        metric(&registry, SPOOLED),
        1,
        "kept for when trust is fixed"
    );
    within("shutdown", a.shutdown(Duration::from_millis(300))).await;
}

#[tokio::test]
async fn udp_delivers_one_datagram_per_event() {
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(&dir.path().join("rsyslog"), Listen::Udp).await;
    let a = Auditor::start(
        &config(syslog(&rsyslog.url(), &dir.path().join("spool"))),
        &Registry::new(),
    )
    .unwrap();
    let mut long = decision(0);
    if let AuditEvent::Decision(d) = &mut long {
        d.path = format!("/v1/files/{}", "x".repeat(4000));
    }
    a.record(long);
    for n in 1..=50 {
        a.record(decision(n));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let lines = rsyslog.wait_for(51).await;
    for line in &lines {
        assert!(
            line.len() <= 2048,
            "UDP messages are capped: {}",
            line.len()
        );
    }
    let first = Received::parse(&lines[0]);
    assert_eq!(first.param("truncated"), Some("true"));
    assert_eq!(first.json["truncated"], true);
    assert_eq!(
        seqs_of(&lines, a.boot_id().unwrap()),
        (1..=51).collect::<Vec<_>>()
    );
    within("shutdown", a.shutdown(Duration::from_secs(2))).await;
}

/// rsyslog down, N events, rsyslog back: all N arrive, in order, none twice.
#[tokio::test]
async fn outage_then_recovery_delivers_all_in_order_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = audit_support::free_tcp_port();
    let mut rsyslog = Rsyslog::configure(&dir.path().join("rsyslog"), Listen::Tcp, port);
    let registry = Registry::new();
    let a = Auditor::start(
        &config(syslog(&rsyslog.url(), &dir.path().join("spool"))),
        &registry,
    )
    .unwrap();
    const N: u64 = 300;
    for n in 1..=N {
        a.record(decision(n));
    }
    eventually("all spooled", || {
        (metric(&registry, SPOOLED) == N).then_some(())
    })
    .await;
    assert_eq!(metric(&registry, SENT), 0);
    assert!(metric(&registry, "portcullis_audit_spool_bytes") > 0);
    rsyslog.restart().await;
    let lines = rsyslog.wait_for(N as usize).await;
    // Settle: nothing more may arrive (no duplicates).
    eventually("sent counter", || {
        (metric(&registry, SENT) == N).then_some(())
    })
    .await;
    within("shutdown", a.shutdown(Duration::from_secs(5))).await;
    let lines_after = rsyslog.messages();
    assert_eq!(
        lines_after.len(),
        lines.len(),
        "no duplicates after shutdown"
    );
    assert_eq!(
        seqs_of(&lines_after, a.boot_id().unwrap()),
        (1..=N).collect::<Vec<_>>()
    );
}

/// rsyslog is killed (SIGKILL) while events flow and comes back: nothing is lost; resent
/// duplicates collapse to exactly N by `event_id`.
#[tokio::test]
async fn receiver_crash_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut rsyslog = Rsyslog::start(&dir.path().join("rsyslog"), Listen::Tcp).await;
    let registry = Registry::new();
    let a = Auditor::start(
        &config(syslog(&rsyslog.url(), &dir.path().join("spool"))),
        &registry,
    )
    .unwrap();
    const N: u64 = 400;
    for n in 1..=N {
        a.record(decision(n));
        if n == N / 2 {
            eventually("first half arrived", || {
                (rsyslog.messages().len() >= 100).then_some(())
            })
            .await;
            rsyslog.kill();
        }
        if n == N * 3 / 4 {
            rsyslog.restart().await;
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let boot = a.boot_id().unwrap().to_owned();
    let distinct = eventually("every event id", || {
        let seen: BTreeSet<u64> = seqs_of(&rsyslog.messages(), &boot).into_iter().collect();
        (seen.len() as u64 == N).then_some(seen)
    })
    .await;
    assert_eq!(distinct, (1..=N).collect::<BTreeSet<_>>());
    within("shutdown", a.shutdown(Duration::from_secs(5))).await;
    let all = seqs_of(&rsyslog.messages(), &boot);
    let dedup: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(dedup.len() as u64, N, "dedupe by event_id gives exactly N");
    eprintln!(
        "crash test: {} received, {} duplicates",
        all.len(),
        all.len() as u64 - N
    );
}

/// Events spooled while the SIEM is down are delivered by the next portcullis process; what
/// was delivered before is not sent again.
#[tokio::test]
async fn restart_delivers_spooled_events() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut rsyslog = Rsyslog::start(&dir.path().join("rsyslog"), Listen::Tcp).await;
    let first_boot;
    {
        let registry = Registry::new();
        let a = Auditor::start(&config(syslog(&rsyslog.url(), &spool)), &registry).unwrap();
        first_boot = a.boot_id().unwrap().to_owned();
        for n in 1..=50 {
            a.record(decision(n));
        }
        rsyslog.wait_for(50).await;
        rsyslog.stop().await;
        for n in 51..=100 {
            a.record(decision(n));
        }
        eventually("spooled", || {
            (metric(&registry, SPOOLED) == 100).then_some(())
        })
        .await;
        within("shutdown", a.shutdown(Duration::from_millis(500))).await;
    }
    rsyslog.restart().await;
    let b = Auditor::start(&config(syslog(&rsyslog.url(), &spool)), &Registry::new()).unwrap();
    let second_boot = b.boot_id().unwrap().to_owned();
    assert_ne!(first_boot, second_boot);
    for n in 1..=10 {
        b.record(decision(n));
    }
    eventually("the second boot's events", || {
        (seqs_of(&rsyslog.messages(), &second_boot).len() == 10).then_some(())
    })
    .await;
    within("shutdown", b.shutdown(Duration::from_secs(5))).await;
    let lines = rsyslog.messages();
    let first = seqs_of(&lines, &first_boot);
    let dedup: BTreeSet<u64> = first.iter().copied().collect();
    assert_eq!(
        dedup,
        (1..=100).collect::<BTreeSet<_>>(),
        "nothing lost across the restart"
    );
    // Order holds per boot; the spooled events precede the new boot's.
    assert!(
        first.windows(2).all(|w| w[0] < w[1] || w[1] <= 50),
        "{first:?}"
    );
    let ids = ids(&lines);
    let last_first = ids.iter().rposition(|(b, _)| *b == first_boot).unwrap();
    let first_second = ids.iter().position(|(b, _)| *b == second_boot).unwrap();
    assert!(last_first < first_second);
    assert_eq!(seqs_of(&lines, &second_boot), (1..=10).collect::<Vec<_>>());
}

/// Shutdown delivers everything within its deadline and records the point it reached, so the
/// next start sends nothing twice.
#[tokio::test]
async fn shutdown_flushes_and_a_clean_restart_resends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let rsyslog = Rsyslog::start(&dir.path().join("rsyslog"), Listen::Tcp).await;
    let mut s = syslog(&rsyslog.url(), &spool);
    s.confirm_after = Some("1h".to_owned());
    let a = Auditor::start(&config(s.clone()), &Registry::new()).unwrap();
    for n in 1..=200 {
        a.record(decision(n));
    }
    a.record(AuditEvent::Shutdown);
    let began = Instant::now();
    within("shutdown", a.shutdown(Duration::from_secs(10))).await;
    assert!(began.elapsed() < Duration::from_secs(10));
    rsyslog.wait_for(201).await;
    let b = Auditor::start(&config(s), &Registry::new()).unwrap();
    b.record(AuditEvent::Start { version: "test" });
    let lines = rsyslog.wait_for(202).await;
    within("shutdown", b.shutdown(Duration::from_secs(5))).await;
    let lines_after = rsyslog.messages();
    assert_eq!(lines_after.len(), 202, "no event sent twice");
    assert_eq!(lines.len(), 202);
    let last = Received::parse(&lines_after[201]);
    assert_eq!(last.param("kind"), Some("start"));
}

/// The wire format, parsed by an independent RFC 5424 parser, including escaping.
#[tokio::test]
async fn wire_format_conforms_to_rfc5424() {
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(&dir.path().join("rsyslog"), Listen::Tcp).await;
    let mut s = syslog(&rsyslog.url(), &dir.path().join("spool"));
    s.sd_id = Some("acme@99999".to_owned());
    s.facility = Some("local3".to_owned());
    let a = Auditor::start(&config(s), &Registry::new()).unwrap();
    let tricky = DecisionEvent {
        request_id: "req \"quoted\"".into(),
        allow: false,
        reason: "forbidden",
        status: 403,
        method: "DELETE".into(),
        path: "/v1/a]b\\c\"d/ünïcode/€".into(),
        route: Some("/v1/{*rest}".into()),
        client_ip: "::1".into(),
        user_agent: Some("Mozilla/5.0 [x] \\ \"y\" = z".into()),
        duration_us: 42,
        ..DecisionEvent::default()
    };
    a.record(AuditEvent::Decision(tricky.clone()));
    let mut allowed = tricky.clone();
    allowed.allow = true;
    allowed.reason = "granted";
    a.record(AuditEvent::Decision(allowed));
    a.record(AuditEvent::Reload {
        file: "policy.yaml".into(),
        ok: false,
        error: Some("policy.yaml:3:5: unknown role \"x]\"".into()),
        generation: 7,
    });
    a.record(AuditEvent::KeyChange {
        action: "key_revoke",
        key_id: Some("k1".into()),
        principal: Some("alice".into()),
        target_key_id: "k2".into(),
        target_principal: "bob".into(),
        result: "ok".into(),
        via: "api",
    });
    let lines = rsyslog.wait_for(4).await;
    let boot = a.boot_id().unwrap().to_owned();

    let m = syslog_loose::parse_message(&lines[0], syslog_loose::Variant::RFC5424);
    assert_eq!(m.protocol, syslog_loose::Protocol::RFC5424(1));
    assert_eq!(m.facility, Some(syslog_loose::SyslogFacility::LOG_LOCAL3));
    assert_eq!(m.severity, Some(syslog_loose::SyslogSeverity::SEV_WARNING));
    assert_eq!(m.hostname, Some(HOST));
    assert_eq!(m.appname, Some("portcullis"));
    assert_eq!(
        m.procid,
        Some(syslog_loose::ProcId::PID(std::process::id() as i32))
    );
    assert_eq!(m.msgid, Some("decision"));
    assert_eq!(m.structured_data.len(), 1);
    assert_eq!(m.structured_data[0].id, "acme@99999");
    let received = Received::parse(&lines[0]);
    let names: Vec<&str> = received.params.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "event_id",
            "seq",
            "time",
            "kind",
            "request_id",
            "decision",
            "reason",
            "status",
            "method",
            "path",
            "route",
            "client_ip",
            "user_agent",
            "duration_us"
        ]
    );
    assert_eq!(
        received.param("event_id"),
        Some(format!("{boot}-1").as_str())
    );
    assert_eq!(received.param("request_id"), Some("req \"quoted\""));
    assert_eq!(received.param("path"), Some(tricky.path.as_str()));
    assert_eq!(received.param("user_agent"), tricky.user_agent.as_deref());
    assert_eq!(received.param("decision"), Some("deny"));
    // The timestamp: UTC, microseconds, equal to the `time` field.
    let ts = m.timestamp.expect("timestamp");
    assert_eq!(ts.offset().local_minus_utc(), 0);
    let time = received.param("time").unwrap();
    assert_eq!(time.len(), "2026-01-01T00:00:00.000000Z".len(), "{time}");
    assert!(lines[0].contains(&format!(" {time} {HOST} portcullis ")));
    // MSG is one JSON object with the same fields and values.
    for (k, v) in &received.params {
        let j = &received.json[k.as_str()];
        let as_text = j
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| j.to_string());
        assert_eq!(&as_text, v, "field {k}");
    }
    assert_eq!(
        received.json.as_object().unwrap().len(),
        received.params.len()
    );

    let allow = syslog_loose::parse_message(&lines[1], syslog_loose::Variant::RFC5424);
    assert_eq!(allow.severity, Some(syslog_loose::SyslogSeverity::SEV_INFO));
    let reload = syslog_loose::parse_message(&lines[2], syslog_loose::Variant::RFC5424);
    assert_eq!(reload.severity, Some(syslog_loose::SyslogSeverity::SEV_ERR));
    assert_eq!(reload.msgid, Some("reload"));
    assert_eq!(
        Received::parse(&lines[2]).param("error"),
        Some("policy.yaml:3:5: unknown role \"x]\"")
    );
    let key = Received::parse(&lines[3]);
    assert_eq!(key.param("kind"), Some("key_change"));
    assert_eq!(key.param("action"), Some("key_revoke"));
    assert_eq!(key.param("target_principal"), Some("bob"));
    within("shutdown", a.shutdown(Duration::from_secs(5))).await;
}

/// Nothing the SIEM, the spool or the JSON lines receive contains the plaintext key (or its
/// hash), and no field exists where one could go.
#[tokio::test]
async fn plaintext_key_never_appears() {
    let secret = "pcs_k7Hq2mZ9wXyV3bN8cL4dF6gH1jK5mP0qR2sT7uV9";
    let secret_hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(secret.as_bytes()))
    };
    for name in FIELD_NAMES {
        let n = name.to_ascii_lowercase();
        assert!(
            ![
                "key",
                "secret",
                "hash",
                "token",
                "authorization",
                "password",
                "body"
            ]
            .contains(&n.as_str())
                && !n.contains("hash")
                && !n.contains("secret")
                && !n.contains("body"),
            "field {name} could carry a key"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(&dir.path().join("rsyslog"), Listen::Tcp).await;
    let jsonl = dir.path().join("audit.jsonl");
    let cfg = AuditConfig {
        file: Some(jsonl.clone()),
        syslog: Some(syslog(&rsyslog.url(), &dir.path().join("spool"))),
        ..AuditConfig::default()
    };
    let a = Auditor::start(&cfg, &Registry::new()).unwrap();
    let mut d = match decision(1) {
        AuditEvent::Decision(d) => d,
        _ => unreachable!(),
    };
    d.key_id = Some("k7Hq2mZ9".into());
    d.key_prefix = Some(secret[..10].to_owned());
    a.record(AuditEvent::Decision(d));
    a.record(AuditEvent::KeyChange {
        action: "key_create",
        key_id: Some("k7Hq2mZ9".into()),
        principal: Some("alice".into()),
        target_key_id: "newkey01".into(),
        target_principal: "alice".into(),
        result: "ok".into(),
        via: "api",
    });
    let lines = rsyslog.wait_for(2).await;
    within("shutdown", a.shutdown(Duration::from_secs(5))).await;
    assert!(lines[0].contains("key_prefix=\"pcs_k7Hq2m\""));
    let mut everything = rsyslog.raw_bytes();
    everything.extend(std::fs::read(&jsonl).unwrap());
    for entry in walk(&dir.path().join("spool")) {
        everything.extend(std::fs::read(entry).unwrap());
    }
    let text = String::from_utf8_lossy(&everything);
    assert!(!text.contains(secret), "the plaintext key leaked");
    assert!(
        !text.contains(&secret[..12]),
        "more than the public prefix leaked"
    );
    assert!(!text.contains(&secret_hash), "the key's hash leaked");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Key changes made by the CLI (`record_once`) reach the SIEM through the running proxy's
/// spool.
#[tokio::test]
async fn cli_records_are_shipped_by_the_running_auditor() {
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(&dir.path().join("rsyslog"), Listen::Tcp).await;
    let cfg = config(syslog(&rsyslog.url(), &dir.path().join("spool")));
    let a = Auditor::start(&cfg, &Registry::new()).unwrap();
    portcullis::audit::record_once(
        &cfg,
        AuditEvent::KeyChange {
            action: "key_deactivate",
            key_id: None,
            principal: None,
            target_key_id: "k1".into(),
            target_principal: "alice".into(),
            result: "ok".into(),
            via: "cli",
        },
    )
    .unwrap();
    let lines = rsyslog.wait_for(1).await;
    let r = Received::parse(&lines[0]);
    assert_eq!(r.param("via"), Some("cli"));
    assert_ne!(r.id().0, a.boot_id().unwrap());
    within("shutdown", a.shutdown(Duration::from_secs(5))).await;
}

/// Sustained events per second to rsyslog over TCP with zero drops. Run with
/// `cargo test --release --test audit_syslog -- --ignored --nocapture throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_to_rsyslog_over_tcp() {
    let n: u64 = std::env::var("AUDIT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let fsync = std::env::var("AUDIT_FSYNC").unwrap_or_else(|_| "always".to_owned());
    let dir = tempfile::tempdir().unwrap();
    let rsyslog = Rsyslog::start(&dir.path().join("rsyslog"), Listen::Tcp).await;
    let registry = Registry::new();
    let mut s = syslog(&rsyslog.url(), &dir.path().join("spool"));
    s.fsync = Some(fsync.clone());
    let a = Auditor::start(&config(s), &registry).unwrap();
    let began = Instant::now();
    for i in 1..=n {
        // Offer as fast as the pipeline takes them without overflowing the queue.
        while i.is_multiple_of(1024) && queue_depth(&registry) > 8_000 {
            tokio::task::yield_now().await;
        }
        a.record(decision(i));
    }
    let recorded = began.elapsed();
    let boot = a.boot_id().unwrap().to_owned();
    eventually("all events at rsyslog", || {
        let lines = std::fs::read_to_string(rsyslog.out_path()).unwrap_or_default();
        (lines.lines().count() as u64 >= n).then_some(())
    })
    .await;
    let elapsed = began.elapsed();
    assert_eq!(metric(&registry, DROPPED), 0);
    let seqs: BTreeSet<u64> = seqs_of(&rsyslog.messages(), &boot).into_iter().collect();
    assert_eq!(seqs.len() as u64, n);
    println!(
        "audit throughput (fsync={fsync}): {n} events recorded in {recorded:?}, all at rsyslog after \
         {elapsed:?}: {:.0} events/s, 0 dropped",
        n as f64 / elapsed.as_secs_f64()
    );
    within("shutdown", a.shutdown(Duration::from_secs(5))).await;
}

fn queue_depth(registry: &Registry) -> u64 {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == "portcullis_audit_queue_depth")
        .and_then(|f| {
            f.get_metric()
                .first()
                .map(|m| m.get_gauge().get_value() as u64)
        })
        .unwrap_or(0)
}
