//! The decision: may this request pass? Pure, from a snapshot, a request view and the time.
//!
//! Order matters and is fixed: the route is looked up first (public routes need no key), then
//! the key (no key or a bad key is 401 whether or not a route matched, so unauthenticated callers
//! learn nothing about the route table), then the route's demand against the key's grants.

use http::Method;

use crate::identity::Caller;
use crate::keys::credential::CredentialError;
use crate::keys::{Key, KeyLookup};
use crate::path::BackendReading;
use crate::policy::grant::{self, Access, Grant};
use crate::policy::{Route, RouteRule};
use crate::state::Snapshot;

/// Why a request was allowed or denied; the audit `reason` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The route needs no key.
    Public,
    /// A grant allowed it.
    Granted,
    /// No key presented.
    NoCredential,
    /// Two different keys, or a malformed credential header.
    AmbiguousCredential,
    /// The key is not known.
    UnknownKey,
    /// The key is deactivated.
    InactiveKey,
    /// The key is past its expiry.
    ExpiredKey,
    /// The key may not do this.
    Forbidden,
    /// No route matches (default deny).
    NoRoute,
    /// The path could not be normalised.
    BadPath,
    /// The backend could read the path as another route (or instance) that the caller may not
    /// use: a different case, a `.format` suffix or `;params` (see `backend:`).
    AmbiguousPath,
    /// A malformed request head: two `Host`s, conflicting hosts, a bad `Host`.
    BadRequest,
    /// A `_method` query parameter, which the backend may read as the method to perform.
    MethodOverride,
    /// A body on a method without body semantics, on a route that does not allow one.
    BodyNotAllowed,
    /// An OAuth access token that is not valid (signature, issuer, audience, times, algorithm).
    InvalidToken,
    /// A valid token whose principal claim names no principal of the policy.
    UnknownPrincipal,
    /// The key (or token principal) is over its rate limit.
    RateLimited,
}

impl Reason {
    /// The reason as audit and metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Public => "public",
            Reason::Granted => "granted",
            Reason::NoCredential => "no_credential",
            Reason::AmbiguousCredential => "ambiguous_credential",
            Reason::UnknownKey => "unknown_key",
            Reason::InactiveKey => "inactive_key",
            Reason::ExpiredKey => "expired_key",
            Reason::Forbidden => "forbidden",
            Reason::NoRoute => "no_route",
            Reason::BadPath => "bad_path",
            Reason::AmbiguousPath => "ambiguous_path",
            Reason::BadRequest => "bad_request",
            Reason::MethodOverride => "method_override",
            Reason::BodyNotAllowed => "body_not_allowed",
            Reason::InvalidToken => "invalid_token",
            Reason::UnknownPrincipal => "unknown_principal",
            Reason::RateLimited => "rate_limited",
        }
    }

    /// Whether the request goes on to the backend.
    pub fn allows(self) -> bool {
        matches!(self, Reason::Public | Reason::Granted)
    }

    /// Whether the denial is about identity (401) rather than permission.
    pub fn is_unauthenticated(self) -> bool {
        matches!(
            self,
            Reason::NoCredential
                | Reason::AmbiguousCredential
                | Reason::UnknownKey
                | Reason::InactiveKey
                | Reason::ExpiredKey
                | Reason::InvalidToken
        )
    }
}

/// A decision and everything that explains it.
pub struct Decision<'s, 'p> {
    /// Why.
    pub reason: Reason,
    /// The matched route, if any.
    pub route: Option<&'s Route>,
    /// The instance named by the route, if any.
    pub instance: Option<&'p str>,
    /// The access the route demands, if protected.
    pub access: Option<Access>,
    /// The identified caller (also on public routes when a valid credential was sent).
    pub caller: Option<Caller<'s>>,
    /// The grant that allowed it.
    pub grant: Option<&'s Grant>,
    /// For `ambiguous_path`: the route another backend reading lands on, which the caller may
    /// not use.
    pub alternate: Option<&'s Route>,
    /// The route filters its answer and the caller's grants cover only some instances: the
    /// answer must be filtered before it is passed on.
    pub filter: bool,
}

impl<'s> Decision<'s, '_> {
    /// The key, when the caller presented one.
    pub fn key(&self) -> Option<Key<'s>> {
        self.caller.and_then(|c| c.key())
    }
}

impl Decision<'_, '_> {
    fn deny(reason: Reason) -> Self {
        Decision {
            reason,
            route: None,
            instance: None,
            access: None,
            caller: None,
            grant: None,
            alternate: None,
            filter: false,
        }
    }
}

/// Decides a request whose path is already normalised.
pub fn decide<'s, 'p>(
    snapshot: &'s Snapshot,
    method: &Method,
    path: &'p str,
    reading: &BackendReading,
    credential: Result<Option<&str>, CredentialError>,
    now: i64,
) -> Decision<'s, 'p>
where
    's: 'p,
{
    judge(
        snapshot,
        method,
        path,
        reading,
        identify(snapshot, credential, now).map(Caller::Key),
    )
}

/// Decides for an already identified caller (or the reason there is none); `explain` uses it
/// with a key chosen by id, so it can never disagree with what the proxy does.
///
/// The literal reading of the path decides; when it allows, every other reading the backend
/// could apply (`reading`) must allow too, or the request is refused as `ambiguous_path`.
pub fn judge<'s, 'p>(
    snapshot: &'s Snapshot,
    method: &Method,
    path: &'p str,
    reading: &BackendReading,
    identified: Result<Caller<'s>, Reason>,
) -> Decision<'s, 'p>
where
    's: 'p,
{
    let path = crate::path::match_form(path);
    let mut decision = judge_hit(snapshot.policy.lookup(method, path), identified);
    if !decision.reason.allows() {
        return decision;
    }
    for alternative in crate::path::alternatives(path, reading) {
        let hit = if alternative.folded {
            snapshot.policy.lookup_folded(method, &alternative.path)
        } else {
            snapshot.policy.lookup(method, &alternative.path)
        };
        // A reading that matches no route raises no objection: the backend has no route there
        // that the policy knows of, and literal templates such as `/openapi.json` keep working.
        let Some(hit) = hit else { continue };
        let route = hit.route;
        let other = judge_hit(Some(hit), identified);
        if !other.reason.allows() {
            decision.reason = Reason::AmbiguousPath;
            decision.access = other.access.or(decision.access);
            decision.grant = None;
            decision.alternate = Some(route);
            break;
        }
    }
    decision
}

/// The decision for one reading: the route found for it (if any) against the caller.
fn judge_hit<'s, 'p>(
    hit: Option<crate::policy::RouteHit<'s, 'p>>,
    identified: Result<Caller<'s>, Reason>,
) -> Decision<'s, 'p>
where
    's: 'p,
{
    let (route, instance) = match &hit {
        Some(h) => (Some(h.route), h.instance),
        None => (None, None),
    };
    let mut decision = Decision {
        route,
        instance,
        ..Decision::deny(Reason::NoRoute)
    };
    if let Some(RouteRule::Public) = route.map(|r| &r.rule) {
        decision.reason = Reason::Public;
        decision.caller = identified.ok();
        return decision;
    }
    let caller = match identified {
        Ok(caller) => caller,
        Err(reason) => {
            decision.reason = reason;
            return decision;
        }
    };
    decision.caller = Some(caller);
    let Some(RouteRule::Protected {
        resource, access, ..
    }) = route.map(|r| &r.rule)
    else {
        return decision;
    };
    decision.access = Some(*access);
    decision.grant = grant::any_allows(caller.grants(), *resource, instance, *access);
    if decision.grant.is_none() && route.is_some_and(|r| r.filter.is_some()) {
        // A list that is filtered admits a caller with the access on some instances: it sees
        // only those.
        decision.grant = grant::some_instance_allows(caller.grants(), *resource, *access);
        decision.filter = decision.grant.is_some();
    }
    decision.reason = if decision.grant.is_some() {
        Reason::Granted
    } else {
        Reason::Forbidden
    };
    decision
}

/// Who presents this credential, or why nobody valid does.
pub fn identify<'s>(
    snapshot: &'s Snapshot,
    credential: Result<Option<&str>, CredentialError>,
    now: i64,
) -> Result<Key<'s>, Reason> {
    let key = match credential {
        Ok(Some(key)) => key,
        Ok(None) => return Err(Reason::NoCredential),
        Err(_) => return Err(Reason::AmbiguousCredential),
    };
    usable(snapshot.keys.lookup(key, now))
}

/// A looked-up key, or the reason it may not be used.
pub fn usable(lookup: KeyLookup<'_>) -> Result<Key<'_>, Reason> {
    match lookup {
        KeyLookup::Valid(key) => Ok(key),
        KeyLookup::Unknown => Err(Reason::UnknownKey),
        KeyLookup::Inactive(_) => Err(Reason::InactiveKey),
        KeyLookup::Expired(_) => Err(Reason::ExpiredKey),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::keys::secret;
    use crate::state::Snapshot;

    const POLICY: &str = r#"
version: 1
routes:
  - match: GET /v1/companies
    resource: companies
    access: read
  - match: GET /v1/companies/{company}
    resource: companies
    instance: company
    access: read
  - match: PUT /v1/companies/{company}
    resource: companies
    instance: company
    access: write
  - match: GET /status
    public: true
principals:
  analyst: { kind: user, grants: ["companies/a:read", "companies/b:write"] }
  boss: { kind: user, grants: ["*:*"] }
"#;

    fn snapshot() -> Snapshot {
        let mut keys = String::from("version: 1\nkeys:\n");
        for (id, principal, extra) in [
            ("an", "analyst", ""),
            ("bo", "boss", ""),
            ("ro", "boss", "    scopes: ['*:read']\n"),
            ("off", "boss", "    active: false\n"),
            ("old", "boss", "    expires: 2001-01-01T00:00:00Z\n"),
        ] {
            keys.push_str(&format!(
                "  - id: {id}\n    prefix: x\n    hash: {}\n    principal: {principal}\n{extra}",
                secret::hash_text(&format!("key-{id}"))
            ));
        }
        Snapshot::compile(POLICY, &keys, 1, &Default::default())
            .unwrap()
            .0
    }

    fn reason(s: &Snapshot, method: Method, path: &str, key: Option<&str>) -> Reason {
        decide(
            s,
            &method,
            path,
            &BackendReading::default(),
            Ok(key),
            1_800_000_000,
        )
        .reason
    }

    #[test]
    fn decision_table() {
        let s = snapshot();
        use Reason::*;
        assert_eq!(reason(&s, Method::GET, "/status", None), Public);
        assert_eq!(reason(&s, Method::GET, "/status", Some("garbage")), Public);
        assert_eq!(
            reason(&s, Method::GET, "/v1/companies/a", None),
            NoCredential
        );
        assert_eq!(reason(&s, Method::GET, "/nowhere", None), NoCredential);
        assert_eq!(
            reason(&s, Method::GET, "/nowhere", Some("garbage")),
            UnknownKey
        );
        assert_eq!(
            reason(&s, Method::GET, "/v1/companies/a", Some("key-off")),
            InactiveKey
        );
        assert_eq!(
            reason(&s, Method::GET, "/v1/companies/a", Some("key-old")),
            ExpiredKey
        );
        assert_eq!(reason(&s, Method::GET, "/nowhere", Some("key-bo")), NoRoute);
        assert_eq!(
            reason(&s, Method::POST, "/v1/companies", Some("key-bo")),
            NoRoute
        );
        assert_eq!(
            reason(&s, Method::GET, "/v1/companies/a", Some("key-an")),
            Granted
        );
        assert_eq!(
            reason(&s, Method::PUT, "/v1/companies/a", Some("key-an")),
            Forbidden
        );
        assert_eq!(
            reason(&s, Method::PUT, "/v1/companies/b", Some("key-an")),
            Granted
        );
        assert_eq!(
            reason(&s, Method::GET, "/v1/companies/c", Some("key-an")),
            Forbidden
        );
        assert_eq!(
            reason(&s, Method::GET, "/v1/companies", Some("key-an")),
            Forbidden
        );
        assert_eq!(
            reason(&s, Method::HEAD, "/v1/companies", Some("key-bo")),
            Granted
        );
        assert_eq!(
            reason(&s, Method::PUT, "/v1/companies/a", Some("key-ro")),
            Forbidden
        );
        assert_eq!(
            reason(&s, Method::GET, "/v1/companies/a", Some("key-ro")),
            Granted
        );
    }

    #[test]
    fn ambiguous_credentials_are_unauthenticated() {
        let s = snapshot();
        let d = decide(
            &s,
            &Method::GET,
            "/v1/companies",
            &BackendReading::default(),
            Err(CredentialError::Ambiguous),
            0,
        );
        assert_eq!(d.reason, Reason::AmbiguousCredential);
        assert!(d.reason.is_unauthenticated());
    }
}
