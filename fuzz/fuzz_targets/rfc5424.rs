//! The RFC 5424 encoder with hostile field text: never a panic, never over the size cap, the
//! structured data always parses (quotes, `\` and `]` escaped), and the JSON record is JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::audit::{render_event, AuditEvent, DecisionEvent};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\u{1}');
    let mut next = || parts.next().unwrap_or("").to_string();
    let event = DecisionEvent {
        request_id: next(),
        reason: "granted",
        status: 200,
        method: next(),
        path: next(),
        route: Some(next()),
        user_agent: Some(next()),
        principal: Some(next()),
        client_ip: next(),
        ..DecisionEvent::default()
    };
    let hostname = next();
    let sd_id = next();
    let cap = 1024 + (data.len() % 4096);
    let (syslog, json) = render_event(AuditEvent::Decision(event), &hostname, &sd_id, cap);
    assert!(syslog.len() <= cap.max(1024), "{} > {cap}", syslog.len());
    let line = String::from_utf8(syslog).expect("the message is UTF-8");
    if syslog_loose::parse_message(&line, syslog_loose::Variant::RFC5424).structured_data.is_empty() {
        panic!("structured data lost: {line}");
    }
    let _: serde_json::Value = serde_json::from_str(&json).expect("the JSON record parses");
});
