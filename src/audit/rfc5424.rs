//! Rendering: turns a stamped event into an RFC 5424 syslog message (for the spool and the SIEM)
//! or a JSON object (the MSG part and the JSON-lines sink). Runs in the writer thread, never on
//! the request path.
//!
//! `<PRI>1 TIMESTAMP HOSTNAME portcullis PROCID MSGID [SD-ID name="value" ...] {json}`
//!
//! Structured-data values escape `"`, `\` and `]`; control characters become U+FFFD there (the
//! JSON keeps them, escaped). The JSON is ASCII-only (non-ASCII as `\uXXXX`), so the MSG needs
//! no BOM. A message longer than the cap is rebuilt with every text field cut to a shorter
//! length (at a character boundary, before escaping) and `truncated="true"`, so it stays valid.

use std::fmt::Write as _;

use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::UtcOffset;

use super::event::{Stamped, Value};

/// `YYYY-MM-DDTHH:MM:SS.uuuuuuZ`.
const TIMESTAMP: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// The RFC 5424 APP-NAME.
pub const APP_NAME: &str = "portcullis";

/// RFC 5424 header field limits.
const HOSTNAME_MAX: usize = 255;
const PROCID_MAX: usize = 128;
const SD_NAME_MAX: usize = 32;

/// The smallest message cap that still fits every event with all text fields emptied.
pub const MIN_MESSAGE_BYTES: usize = 1024;

/// Per-field byte limits tried in turn when a message is over the cap.
const FIELD_LIMITS: [Option<usize>; 6] = [None, Some(1024), Some(256), Some(64), Some(16), Some(0)];

/// Syslog facility names and codes (RFC 5424 table 1, common names).
const FACILITIES: &[(&str, u8)] = &[
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("ntp", 12),
    ("audit", 13),
    ("security", 13),
    ("alert", 14),
    ("console", 14),
    ("clock", 15),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

/// The numeric code of a facility name (`authpriv` → 10).
pub fn facility_code(name: &str) -> Option<u8> {
    FACILITIES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, c)| *c)
}

/// Whether `s` is a valid RFC 5424 SD-NAME (also used for the SD-ID `name@number`).
pub fn valid_sd_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= SD_NAME_MAX
        && s.bytes()
            .all(|b| (33..=126).contains(&b) && !matches!(b, b'=' | b']' | b'"'))
}

/// Printable US-ASCII only, at most `max` bytes; NILVALUE when nothing is left.
fn header_field(s: &str, max: usize) -> String {
    let clean: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if clean.is_empty() {
        "-".to_owned()
    } else {
        clean
    }
}

/// This machine's name, for HOSTNAME when the config gives none.
pub fn system_hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "-".to_owned())
}

/// Renders events for one boot with one set of header values.
#[derive(Debug, Clone)]
pub struct Formatter {
    boot_id: String,
    facility: u8,
    hostname: String,
    procid: String,
    sd_id: String,
    max_bytes: usize,
}

impl Formatter {
    /// A formatter; `hostname` and `sd_id` are cleaned to RFC 5424's character set and limits.
    pub fn new(
        boot_id: &str,
        facility: u8,
        hostname: &str,
        sd_id: &str,
        max_bytes: usize,
    ) -> Formatter {
        let sd_id: String = sd_id
            .chars()
            .filter(|c| c.is_ascii_graphic() && !matches!(c, '=' | ']' | '"'))
            .take(SD_NAME_MAX)
            .collect();
        Formatter {
            boot_id: boot_id.to_owned(),
            facility: facility.min(23),
            hostname: header_field(hostname, HOSTNAME_MAX),
            procid: header_field(&std::process::id().to_string(), PROCID_MAX),
            sd_id: if sd_id.is_empty() {
                super::DEFAULT_SD_ID.to_owned()
            } else {
                sd_id
            },
            max_bytes: max_bytes.max(MIN_MESSAGE_BYTES),
        }
    }

    /// `event_id`: the boot id and the sequence number.
    pub fn event_id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.boot_id)
    }

    /// The event as one JSON object (ASCII, no newline), untruncated: the JSON-lines record.
    pub fn json(&self, s: &Stamped) -> String {
        let mut out = String::with_capacity(512);
        self.write_json(s, &self.common(s), None, &mut out);
        out
    }

    /// The event as an RFC 5424 message of at most the configured cap.
    pub fn syslog(&self, s: &Stamped) -> Vec<u8> {
        let common = self.common(s);
        for limit in FIELD_LIMITS {
            let msg = self.render(s, &common, limit, true);
            if msg.len() <= self.max_bytes {
                return msg;
            }
        }
        let mut msg = self.render(s, &common, Some(0), false);
        msg.truncate(self.max_bytes);
        msg
    }

    /// The fields every event starts with, rendered once per event.
    fn common(&self, s: &Stamped) -> Common {
        Common {
            event_id: self.event_id(s.seq),
            time: timestamp(s),
        }
    }

    fn render(&self, s: &Stamped, c: &Common, limit: Option<usize>, with_msg: bool) -> Vec<u8> {
        let mut out = String::with_capacity(1024);
        let pri = u16::from(self.facility) * 8 + s.event.severity() as u16;
        let _ = write!(
            out,
            "<{pri}>1 {} {} {APP_NAME} {} {} [{}",
            c.time,
            self.hostname,
            self.procid,
            s.event.kind(),
            self.sd_id
        );
        sd_param(&mut out, "event_id", Value::Str(&c.event_id), None);
        sd_param(&mut out, "seq", Value::Num(s.seq), None);
        sd_param(&mut out, "time", Value::Str(&c.time), None);
        sd_param(&mut out, "kind", Value::Word(s.event.kind()), None);
        for (name, value) in s.fields() {
            sd_param(&mut out, name, value, limit);
        }
        if limit.is_some() {
            sd_param(&mut out, "truncated", Value::Word("true"), None);
        }
        out.push(']');
        if with_msg {
            out.push(' ');
            self.write_json(s, c, limit, &mut out);
        }
        out.into_bytes()
    }

    fn write_json(&self, s: &Stamped, c: &Common, limit: Option<usize>, out: &mut String) {
        out.push('{');
        let mut first = true;
        let mut key = |name: &str, out: &mut String| {
            if !first {
                out.push(',');
            }
            first = false;
            json_string(name, out);
            out.push(':');
        };
        key("event_id", out);
        json_string(&c.event_id, out);
        key("seq", out);
        let _ = write!(out, "{}", s.seq);
        key("time", out);
        json_string(&c.time, out);
        key("kind", out);
        json_string(s.event.kind(), out);
        for (name, value) in s.fields() {
            key(name, out);
            match value {
                Value::Str(v) => json_string(cut(v, limit), out),
                Value::Word(w) => json_string(w, out),
                Value::Num(n) => {
                    let _ = write!(out, "{n}");
                }
            }
        }
        if limit.is_some() {
            key("truncated", out);
            out.push_str("true");
        }
        out.push('}');
    }
}

/// The fields every event starts with.
struct Common {
    event_id: String,
    time: String,
}

/// Appends ` name="value"`, text cut to `limit` bytes and escaped.
fn sd_param(out: &mut String, name: &str, value: Value<'_>, limit: Option<usize>) {
    let _ = write!(out, " {name}=\"");
    match value {
        Value::Str(v) => sd_escape(cut(v, limit), out),
        Value::Word(w) => sd_escape(w, out),
        Value::Num(n) => {
            let _ = write!(out, "{n}");
        }
    }
    out.push('"');
}

/// The event time as RFC 3339 UTC with microseconds.
fn timestamp(s: &Stamped) -> String {
    s.time
        .to_offset(UtcOffset::UTC)
        .format(TIMESTAMP)
        .unwrap_or_else(|_| "-".to_owned())
}

/// At most `limit` bytes of `s`, cut at a character boundary.
fn cut(s: &str, limit: Option<usize>) -> &str {
    let Some(limit) = limit else { return s };
    if s.len() <= limit {
        return s;
    }
    let mut end = limit;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// RFC 5424 PARAM-VALUE escaping: `"`, `\` and `]` get a backslash.
fn sd_escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '"' | '\\' | ']' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

/// A JSON string literal using only ASCII.
fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_graphic() || c == ' ' => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::audit::event::{AuditEvent, DecisionEvent};
    use time::OffsetDateTime;

    fn formatter(max: usize) -> Formatter {
        Formatter::new("b00t", 10, "host.example", "portcullis@32473", max)
    }

    fn decision() -> DecisionEvent {
        DecisionEvent {
            request_id: "req-1".into(),
            allow: true,
            reason: "granted",
            status: 200,
            method: "GET".into(),
            path: "/v1/datasets/ds_1".into(),
            route: Some("/v1/datasets/{dataset}".into()),
            resource: Some("datasets".into()),
            instance: Some("ds_1".into()),
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
            client_ip: "10.0.0.1".into(),
            user_agent: Some("curl/8".into()),
            upstream_status: Some(200),
            duration_us: 1234,
        }
    }

    fn stamped(event: AuditEvent) -> Stamped {
        Stamped {
            seq: 7,
            time: OffsetDateTime::from_unix_timestamp_nanos(1_795_000_000_123_456_789)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            event,
        }
    }

    fn text(b: Vec<u8>) -> String {
        String::from_utf8(b).unwrap_or_default()
    }

    #[test]
    fn header_and_structured_data_in_fixed_order() {
        let msg = text(formatter(8192).syslog(&stamped(AuditEvent::Decision(decision()))));
        let pid = std::process::id();
        let expected = format!(
            "<86>1 2026-11-18T11:06:40.123456Z host.example portcullis {pid} decision \
             [portcullis@32473 event_id=\"b00t-7\" seq=\"7\" time=\"2026-11-18T11:06:40.123456Z\" \
             kind=\"decision\" request_id=\"req-1\" decision=\"allow\" reason=\"granted\" \
             status=\"200\" method=\"GET\" path=\"/v1/datasets/ds_1\" \
             route=\"/v1/datasets/{{dataset}}\" resource=\"datasets\" instance=\"ds_1\" \
             access=\"read\" key_id=\"k7Hq2mZ9\" key_prefix=\"pcs_k7Hq2m\" principal=\"alice\" \
             principal_kind=\"user\" credential=\"key\" client_ip=\"10.0.0.1\" user_agent=\"curl/8\" \
             upstream_status=\"200\" duration_us=\"1234\"] "
        );
        assert!(msg.starts_with(&expected), "{msg}");
        let json: serde_json::Value =
            serde_json::from_str(&msg[expected.len()..]).unwrap_or_default();
        assert_eq!(json["event_id"], "b00t-7");
        assert_eq!(json["seq"], 7);
        assert_eq!(json["status"], 200);
        assert_eq!(json["decision"], "allow");
        assert_eq!(json["time"], "2026-11-18T11:06:40.123456Z");
    }

    #[test]
    fn denial_is_a_warning() {
        let mut d = decision();
        d.allow = false;
        let msg = text(formatter(8192).syslog(&stamped(AuditEvent::Decision(d))));
        assert!(msg.starts_with("<84>1 "), "{msg}");
    }

    #[test]
    fn escapes_quote_backslash_bracket_and_controls() {
        let mut d = decision();
        d.user_agent = Some("a\"b\\c]d\ne\u{7f}é".into());
        let f = formatter(8192);
        let msg = text(f.syslog(&stamped(AuditEvent::Decision(d))));
        let expected = "user_agent=\"a\\\"b\\\\c\\]d\u{FFFD}e\u{FFFD}é\" upstream_status";
        assert!(msg.contains(expected), "{msg}");
        let json = &msg[msg.find("] {").map(|i| i + 2).unwrap_or(0)..];
        assert!(json.is_ascii());
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
        assert_eq!(v["user_agent"], "a\"b\\c]d\ne\u{7f}é");
    }

    #[test]
    fn json_handles_astral_characters() {
        let mut out = String::new();
        json_string("x😀\u{1}", &mut out);
        assert_eq!(out, r#""x\ud83d\ude00\u0001""#);
        let back: String = serde_json::from_str(&out).unwrap_or_default();
        assert_eq!(back, "x😀\u{1}");
    }

    #[test]
    fn oversize_is_cut_at_char_boundaries_and_stays_valid() {
        let mut d = decision();
        d.path = format!("/{}", "é]".repeat(3000));
        d.user_agent = Some("\"".repeat(5000));
        let f = formatter(2048);
        let bytes = f.syslog(&stamped(AuditEvent::Decision(d)));
        assert!(bytes.len() <= 2048, "{}", bytes.len());
        let msg = text(bytes);
        assert!(msg.contains(" truncated=\"true\"]"), "{msg}");
        let json = &msg[msg.find("] {").map(|i| i + 2).unwrap_or(0)..];
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
        assert_eq!(v["truncated"], true);
        assert_eq!(v["event_id"], "b00t-7");
    }

    #[test]
    fn worst_case_fits_the_minimum_cap() {
        let long = "\"".repeat(10_000);
        let d = DecisionEvent {
            request_id: long.clone(),
            method: long.clone(),
            path: long.clone(),
            route: Some(long.clone()),
            resource: Some(long.clone()),
            instance: Some(long.clone()),
            key_id: Some(long.clone()),
            key_prefix: Some(long.clone()),
            principal: Some(long.clone()),
            client_ip: long.clone(),
            user_agent: Some(long.clone()),
            upstream_status: Some(u16::MAX),
            duration_us: u64::MAX,
            status: u16::MAX,
            access: Some("manage"),
            principal_kind: Some("robot"),
            reason: "expired_key",
            ..DecisionEvent::default()
        };
        let f = Formatter::new(&"b".repeat(32), 23, &"h".repeat(400), &"s".repeat(40), 0);
        let mut s = stamped(AuditEvent::Decision(d));
        s.seq = u64::MAX;
        let msg = text(f.syslog(&s));
        assert!(msg.len() <= MIN_MESSAGE_BYTES, "{}", msg.len());
        // Fixed-vocabulary fields are never cut; at this extreme the MSG part is left out.
        assert!(msg.contains(" reason=\"expired_key\" "), "{msg}");
        assert!(msg.ends_with(" truncated=\"true\"]"), "{msg}");
    }

    #[test]
    fn header_fields_respect_limits() {
        let f = Formatter::new(
            "b",
            10,
            &format!("a b\u{e9}{}", "x".repeat(300)),
            "bad id=\"x]",
            0,
        );
        assert_eq!(f.hostname.len(), HOSTNAME_MAX);
        assert!(f.hostname.starts_with("abx"));
        assert!(valid_sd_name(&f.sd_id), "{}", f.sd_id);
        assert_eq!(Formatter::new("b", 10, "", "", 0).hostname, "-");
        assert!(valid_sd_name("portcullis@32473"));
        assert!(!valid_sd_name("a b"));
        assert!(!valid_sd_name(&"x".repeat(33)));
    }

    #[test]
    fn facilities() {
        assert_eq!(facility_code("authpriv"), Some(10));
        assert_eq!(facility_code("LOCAL7"), Some(23));
        assert_eq!(facility_code("nope"), None);
    }

    #[test]
    fn other_kinds_render() {
        let f = formatter(8192);
        let reload = AuditEvent::Reload {
            file: "policy.yaml".into(),
            ok: false,
            error: Some("bad".into()),
            generation: 3,
        };
        let msg = text(f.syslog(&stamped(reload)));
        assert!(msg.starts_with("<83>1 "), "{msg}");
        assert!(msg.contains(" reload [portcullis@32473 "), "{msg}");
        assert!(
            msg.contains("file=\"policy.yaml\" result=\"error\" error=\"bad\" generation=\"3\"]")
        );
        let msg = text(f.syslog(&stamped(AuditEvent::Shutdown)));
        assert!(msg.contains(" shutdown [portcullis@32473 "), "{msg}");
        assert!(msg.ends_with("\"kind\":\"shutdown\"}"), "{msg}");
    }
}
