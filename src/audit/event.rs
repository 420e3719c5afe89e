//! The audit event model: what the request path, the reloader and the key CLI hand to
//! [`Auditor::record`](super::Auditor::record), and the one fixed list of fields every sink
//! renders (RFC 5424 structured data, the JSON MSG, JSON lines). Keeping a single field list is
//! what makes the formats agree and lets a test prove no field can carry a key.

use time::OffsetDateTime;

/// One decision, owned (the request path fills it and hands it over).
#[derive(Debug, Clone, Default)]
pub struct DecisionEvent {
    /// The request id the client and the backend also see.
    pub request_id: String,
    /// Whether the request went on to the backend.
    pub allow: bool,
    /// Why (`granted`, `forbidden`, ...; see SPEC).
    pub reason: &'static str,
    /// The status the client received.
    pub status: u16,
    /// The HTTP method.
    pub method: String,
    /// The normalised path (no query string).
    pub path: String,
    /// The matched route template.
    pub route: Option<String>,
    /// The route's resource.
    pub resource: Option<String>,
    /// The instance named by the route's path parameter.
    pub instance: Option<String>,
    /// The access level the route demands.
    pub access: Option<&'static str>,
    /// The presented key's public id.
    pub key_id: Option<String>,
    /// The presented key's public prefix (first 10 characters).
    pub key_prefix: Option<String>,
    /// The key's principal.
    pub principal: Option<String>,
    /// `user` or `robot`.
    pub principal_kind: Option<&'static str>,
    /// How the caller proved itself: `key` or `oauth`.
    pub credential: Option<&'static str>,
    /// For a token: its issuer.
    pub issuer: Option<String>,
    /// For a token: the client it was issued to (`azp` or `client_id`).
    pub client_id: Option<String>,
    /// The client's address.
    pub client_ip: String,
    /// The client's `User-Agent`.
    pub user_agent: Option<String>,
    /// The backend's status, when the request reached it.
    pub upstream_status: Option<u16>,
    /// On a filtered route: how many items were removed from the answer.
    pub filtered: Option<u64>,
    /// On a filtered route: why the answer could not be filtered (it was refused with 502).
    pub filter_error: Option<&'static str>,
    /// With `shadow_policy:`: what the shadow policy would have decided (`allow` or `deny`).
    pub shadow_decision: Option<&'static str>,
    /// With `shadow_policy:`: the shadow policy's reason.
    pub shadow_reason: Option<&'static str>,
    /// Time spent on the whole request, in microseconds.
    pub duration_us: u64,
}

/// Something worth an audit record.
// Decisions are nearly every event and the largest; boxing them would add an
// allocation per request to save a few bytes on the rare reload and key events.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum AuditEvent {
    /// An allow or a deny.
    Decision(DecisionEvent),
    /// A policy, keys or certificate file was reloaded (or rejected).
    Reload {
        /// Which file.
        file: String,
        /// Whether the new content was taken.
        ok: bool,
        /// Why not.
        error: Option<String>,
        /// The state generation after the attempt.
        generation: u64,
    },
    /// A key was created, rotated, (de)activated or revoked.
    KeyChange {
        /// `key_create`, `key_rotate`, `key_activate`, `key_deactivate` or `key_revoke`.
        action: &'static str,
        /// The acting key (absent for the CLI).
        key_id: Option<String>,
        /// The acting principal.
        principal: Option<String>,
        /// The key acted on.
        target_key_id: String,
        /// The principal owning the key acted on.
        target_principal: String,
        /// `ok` or the denial reason.
        result: String,
        /// `cli` or `api`.
        via: &'static str,
    },
    /// The proxy started.
    Start {
        /// The portcullis version.
        version: &'static str,
    },
    /// The proxy is stopping.
    Shutdown,
}

/// RFC 5424 severities used by the audit stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Severity {
    /// A reload that failed.
    Error = 3,
    /// A denial, a refused key change.
    Warning = 4,
    /// Start, shutdown, a successful reload or key change.
    Notice = 5,
    /// An allow.
    Info = 6,
}

/// An event as queued: stamped on the request path with its sequence number and time.
#[derive(Debug, Clone)]
pub(crate) struct Stamped {
    /// Increases by one per event within a boot.
    pub seq: u64,
    /// When `record` was called.
    pub time: OffsetDateTime,
    /// The event.
    pub event: AuditEvent,
}

/// A field value as rendered: SD always quotes, JSON keeps numbers as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Value<'a> {
    /// Text from the request or the operator (may be cut to fit a message cap).
    Str(&'a str),
    /// A word from a fixed vocabulary (`allow`, `forbidden`, `read`, ...), never cut.
    Word(&'static str),
    /// A number.
    Num(u64),
}

/// Every field name any sink may emit, in the order they can appear. Nothing here can hold a
/// key, a key hash or a body; `tests` check it.
pub const FIELD_NAMES: &[&str] = &[
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
    "resource",
    "instance",
    "access",
    "key_id",
    "key_prefix",
    "principal",
    "principal_kind",
    "credential",
    "issuer",
    "client_id",
    "client_ip",
    "user_agent",
    "upstream_status",
    "filtered",
    "filter_error",
    "shadow_decision",
    "shadow_reason",
    "duration_us",
    "file",
    "result",
    "error",
    "generation",
    "action",
    "target_key_id",
    "target_principal",
    "via",
    "version",
    "truncated",
];

impl AuditEvent {
    /// The MSGID / `kind`: names the kind of event.
    pub fn kind(&self) -> &'static str {
        match self {
            AuditEvent::Decision(_) => "decision",
            AuditEvent::Reload { .. } => "reload",
            AuditEvent::KeyChange { .. } => "key_change",
            AuditEvent::Start { .. } => "start",
            AuditEvent::Shutdown => "shutdown",
        }
    }

    /// Allows are informational, denials warnings, failed reloads errors.
    pub(crate) fn severity(&self) -> Severity {
        match self {
            AuditEvent::Decision(d) if d.allow => Severity::Info,
            AuditEvent::Decision(_) => Severity::Warning,
            AuditEvent::Reload { ok: true, .. } => Severity::Notice,
            AuditEvent::Reload { .. } => Severity::Error,
            AuditEvent::KeyChange { result, .. } if result == "ok" => Severity::Notice,
            AuditEvent::KeyChange { .. } => Severity::Warning,
            AuditEvent::Start { .. } | AuditEvent::Shutdown => Severity::Notice,
        }
    }
}

/// Pushes `name` when the value is present.
fn opt<'a>(out: &mut Vec<(&'static str, Value<'a>)>, name: &'static str, v: Option<&'a str>) {
    if let Some(v) = v {
        out.push((name, Value::Str(v)));
    }
}

impl Stamped {
    /// The event's fields after the common ones (`event_id`, `seq`, `time`, `kind`), in the
    /// fixed order. Absent optional fields are left out.
    pub(crate) fn fields(&self) -> Vec<(&'static str, Value<'_>)> {
        let mut f = Vec::with_capacity(20);
        match &self.event {
            AuditEvent::Decision(d) => decision_fields(d, &mut f),
            AuditEvent::Reload {
                file,
                ok,
                error,
                generation,
            } => {
                f.push(("file", Value::Str(file)));
                f.push(("result", Value::Word(if *ok { "ok" } else { "error" })));
                opt(&mut f, "error", error.as_deref());
                f.push(("generation", Value::Num(*generation)));
            }
            AuditEvent::KeyChange {
                action,
                key_id,
                principal,
                target_key_id,
                target_principal,
                result,
                via,
            } => {
                f.push(("action", Value::Word(action)));
                opt(&mut f, "key_id", key_id.as_deref());
                opt(&mut f, "principal", principal.as_deref());
                f.push(("target_key_id", Value::Str(target_key_id)));
                f.push(("target_principal", Value::Str(target_principal)));
                f.push(("result", Value::Str(result)));
                f.push(("via", Value::Word(via)));
            }
            AuditEvent::Start { version } => f.push(("version", Value::Word(version))),
            AuditEvent::Shutdown => {}
        }
        f
    }
}

fn decision_fields<'a>(d: &'a DecisionEvent, f: &mut Vec<(&'static str, Value<'a>)>) {
    f.push(("request_id", Value::Str(&d.request_id)));
    f.push((
        "decision",
        Value::Word(if d.allow { "allow" } else { "deny" }),
    ));
    f.push(("reason", Value::Word(d.reason)));
    f.push(("status", Value::Num(u64::from(d.status))));
    f.push(("method", Value::Str(&d.method)));
    f.push(("path", Value::Str(&d.path)));
    opt(f, "route", d.route.as_deref());
    opt(f, "resource", d.resource.as_deref());
    opt(f, "instance", d.instance.as_deref());
    if let Some(a) = d.access {
        f.push(("access", Value::Word(a)));
    }
    opt(f, "key_id", d.key_id.as_deref());
    opt(f, "key_prefix", d.key_prefix.as_deref());
    opt(f, "principal", d.principal.as_deref());
    if let Some(k) = d.principal_kind {
        f.push(("principal_kind", Value::Word(k)));
    }
    if let Some(c) = d.credential {
        f.push(("credential", Value::Word(c)));
    }
    opt(f, "issuer", d.issuer.as_deref());
    opt(f, "client_id", d.client_id.as_deref());
    f.push(("client_ip", Value::Str(&d.client_ip)));
    opt(f, "user_agent", d.user_agent.as_deref());
    if let Some(s) = d.upstream_status {
        f.push(("upstream_status", Value::Num(u64::from(s))));
    }
    if let Some(n) = d.filtered {
        f.push(("filtered", Value::Num(n)));
    }
    if let Some(e) = d.filter_error {
        f.push(("filter_error", Value::Word(e)));
    }
    if let Some(s) = d.shadow_decision {
        f.push(("shadow_decision", Value::Word(s)));
    }
    if let Some(s) = d.shadow_reason {
        f.push(("shadow_reason", Value::Word(s)));
    }
    f.push(("duration_us", Value::Num(d.duration_us)));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn full_decision() -> DecisionEvent {
        DecisionEvent {
            request_id: "r1".into(),
            allow: false,
            reason: "forbidden",
            status: 403,
            method: "GET".into(),
            path: "/v1/datasets/x".into(),
            route: Some("/v1/datasets/{dataset}".into()),
            resource: Some("datasets".into()),
            instance: Some("x".into()),
            access: Some("read"),
            key_id: Some("k1".into()),
            key_prefix: Some("pcs_k1".into()),
            principal: Some("alice".into()),
            principal_kind: Some("user"),
            credential: Some("oauth"),
            issuer: Some("https://idp/".into()),
            client_id: Some("tableau".into()),
            client_ip: "127.0.0.1".into(),
            user_agent: Some("curl".into()),
            upstream_status: Some(200),
            filtered: Some(2),
            filter_error: None,
            shadow_decision: Some("deny"),
            shadow_reason: Some("forbidden"),
            duration_us: 12,
        }
    }

    fn all_events() -> Vec<AuditEvent> {
        vec![
            AuditEvent::Decision(full_decision()),
            AuditEvent::Reload {
                file: "p".into(),
                ok: false,
                error: Some("e".into()),
                generation: 1,
            },
            AuditEvent::KeyChange {
                action: "key_create",
                key_id: Some("k".into()),
                principal: Some("p".into()),
                target_key_id: "t".into(),
                target_principal: "tp".into(),
                result: "ok".into(),
                via: "api",
            },
            AuditEvent::Start { version: "1" },
            AuditEvent::Shutdown,
        ]
    }

    #[test]
    fn every_emitted_field_is_listed_in_order() {
        for event in all_events() {
            let s = Stamped {
                seq: 1,
                time: OffsetDateTime::UNIX_EPOCH,
                event,
            };
            let names: Vec<_> = s.fields().iter().map(|(n, _)| *n).collect();
            let positions: Vec<_> = names
                .iter()
                .map(|n| FIELD_NAMES.iter().position(|f| f == n))
                .collect();
            assert!(positions.iter().all(Option::is_some), "{names:?}");
            if !matches!(s.event, AuditEvent::KeyChange { .. }) {
                assert!(positions.windows(2).all(|w| w[0] < w[1]), "{names:?}");
            }
        }
    }

    #[test]
    fn no_field_can_hold_a_key_hash_or_body() {
        // `credential` holds only the words `key` or `oauth` (Value::Word), never a credential.
        for name in FIELD_NAMES.iter().filter(|n| **n != "credential") {
            let lower = name.to_ascii_lowercase();
            for bad in [
                "hash",
                "secret",
                "body",
                "password",
                "token",
                "auth",
                "credential",
            ] {
                assert!(!lower.contains(bad), "{name}");
            }
            assert_ne!(lower, "key");
            assert!(lower == "key_id" || lower == "key_prefix" || !lower.starts_with("key"));
        }
    }

    #[test]
    fn field_names_are_valid_sd_names() {
        for name in FIELD_NAMES {
            assert!(!name.is_empty() && name.len() <= 32);
            assert!(name
                .bytes()
                .all(|b| (33..=126).contains(&b) && !b"= ]\"".contains(&b)));
        }
    }

    #[test]
    fn severity_separates_allow_from_deny() {
        let mut d = full_decision();
        assert_eq!(
            AuditEvent::Decision(d.clone()).severity(),
            Severity::Warning
        );
        d.allow = true;
        assert_eq!(AuditEvent::Decision(d).severity(), Severity::Info);
        let reload = |ok| AuditEvent::Reload {
            file: String::new(),
            ok,
            error: None,
            generation: 0,
        };
        assert_eq!(reload(false).severity(), Severity::Error);
        assert_eq!(reload(true).severity(), Severity::Notice);
    }
}
