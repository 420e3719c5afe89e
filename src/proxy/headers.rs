//! Header rewriting between client and backend: hop-by-hop removal, credential removal,
//! identity headers the client cannot forge, and the forwarding headers.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::identity::Caller;
use crate::keys::credential;

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_PRINCIPAL: HeaderName = HeaderName::from_static("x-portcullis-principal");
static X_PRINCIPAL_KIND: HeaderName = HeaderName::from_static("x-portcullis-principal-kind");
static X_KEY_ID: HeaderName = HeaderName::from_static("x-portcullis-key-id");
static X_CREDENTIAL: HeaderName = HeaderName::from_static("x-portcullis-credential");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
fn hop_by_hop() -> [&'static HeaderName; 7] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
    ]
}

/// Removes hop-by-hop headers, including those the `Connection` header names. `Upgrade` is
/// removed too unless `keep_upgrade`, in which case `Connection: upgrade` is put back.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names, without hashing: most messages carry no hop-by-hop header at
    // all, or only `Connection: keep-alive`, and then the removals below are not needed.
    let mut connection = false;
    let mut other = false;
    for name in headers.keys() {
        if name == header::CONNECTION {
            connection = true;
        } else if name == header::TE || name == header::UPGRADE || hop_by_hop().contains(&name) {
            other = true;
        }
    }
    if connection {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // `keep-alive` is removed below anyway; `close` and `upgrade` are the other usual
            // tokens and cost a parse only when they name a header that is there.
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            if name != header::UPGRADE || !keep_upgrade {
                headers.remove(&name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    if other {
        for name in hop_by_hop() {
            headers.remove(name);
        }
        // `TE: trailers` is the one TE value worth passing on (gRPC needs it); the rest are
        // hop-by-hop.
        let trailers_only = headers.get_all(header::TE).iter().all(|v| {
            v.to_str()
                .is_ok_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
        if !trailers_only {
            headers.remove(header::TE);
        }
        if !keep_upgrade {
            headers.remove(header::UPGRADE);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// What the backend is told to expect from the client's headers (`backend:` and
/// `trust_forwarded` in `portcullis.yaml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderRules {
    /// Pass headers whose names contain `_` (nginx's `underscores_in_headers`). Off by
    /// default: CGI-style backends (wsgiref, PHP, Rack) fold `X_Forwarded_For` into
    /// `X-Forwarded-For`, so an underscore spelling can plant any header the proxy owns.
    pub underscores: bool,
    /// The backend may honour method and URL override headers: remove them.
    pub method_override: bool,
    /// A proxy we trust sits in front: keep its forwarding and client-address headers.
    pub trust_forwarded: bool,
}

impl Default for HeaderRules {
    fn default() -> Self {
        HeaderRules {
            underscores: false,
            method_override: true,
            trust_forwarded: false,
        }
    }
}

/// Headers that make a backend perform another method or serve another path than the request
/// line says (Symfony, Laravel, Slim, Express `method-override`, Spring's HiddenHttpMethodFilter,
/// IIS URL Rewrite).
const OVERRIDE_HEADERS: [&str; 7] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-method",
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
];

/// Headers describing the client or the original request that only a trusted proxy may set.
/// `X-Forwarded-For`, `Forwarded` and `X-Forwarded-Proto` are then set by us.
const FORWARDING_HEADERS: [&str; 16] = [
    "x-forwarded-for",
    "forwarded",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-originating-ip",
];

/// Whether a client header must not reach the backend under `rules`.
fn forbidden(name: &str, rules: &HeaderRules) -> bool {
    let underscore = name.as_bytes().contains(&b'_');
    if underscore && !rules.underscores {
        return true;
    }
    // Every name below starts with one of these: most headers are dismissed on one byte.
    if !matches!(name.as_bytes().first(), Some(b'x' | b'f' | b't' | b'c')) {
        return false;
    }
    if folds_to_prefix(name, "x-portcullis-") || folds_to(name, "x-api-key") {
        return true;
    }
    let in_list = |list: &[&str]| list.iter().any(|owned| folds_to(name, owned));
    if rules.method_override && in_list(&OVERRIDE_HEADERS) {
        return true;
    }
    if in_list(&FORWARDING_HEADERS) {
        // A trusted proxy writes these in their standard spelling only.
        return !rules.trust_forwarded || underscore;
    }
    underscore && folds_to(name, "x-request-id")
}

/// Removes everything a client must not pass to the backend: key-carrying credentials, identity
/// headers it made up, and (per `rules`) underscore spellings, override headers and forwarding
/// headers it planted.
pub fn strip_client_headers(headers: &mut HeaderMap, rules: &HeaderRules) {
    // One pass over the names; `X-API-Key` and every spelling of it is among the forbidden.
    let mut authorization = false;
    let planted: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            authorization |= *k == header::AUTHORIZATION;
            forbidden(k.as_str(), rules)
        })
        .cloned()
        .collect();
    for name in planted {
        headers.remove(&name);
    }
    if authorization
        && headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .any(credential::is_credential_authorization)
    {
        let others: Vec<HeaderValue> = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter(|v| !credential::is_credential_authorization(v))
            .cloned()
            .collect();
        headers.remove(header::AUTHORIZATION);
        for v in others {
            headers.append(header::AUTHORIZATION, v);
        }
    }
}

/// Whether `name` equals `target` once `_` is read as `-` (header names are already lower case).
/// Compared byte by byte: this runs for every header of every request.
fn folds_to(name: &str, target: &str) -> bool {
    name.len() == target.len() && folds_to_prefix(name, target)
}

fn folds_to_prefix(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name
            .bytes()
            .zip(prefix.bytes())
            .all(|(n, p)| n == p || (n == b'_' && p == b'-'))
}

/// Sets the identity headers for a caller the proxy identified: principal, kind, how it proved
/// itself (`key` or `oauth`), and the key id for a key.
pub fn set_identity(headers: &mut HeaderMap, caller: Caller<'_>) {
    let put = |headers: &mut HeaderMap, name: &HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name.clone(), v);
        }
    };
    match &caller.principal().header_value {
        Some(v) => {
            headers.insert(X_PRINCIPAL.clone(), v.clone());
        }
        None => {
            headers.remove(&X_PRINCIPAL);
        }
    }
    headers.insert(
        X_PRINCIPAL_KIND.clone(),
        HeaderValue::from_static(caller.principal().kind.as_str()),
    );
    headers.insert(
        X_CREDENTIAL.clone(),
        HeaderValue::from_static(caller.credential()),
    );
    if let Some(key) = caller.key() {
        put(headers, &X_KEY_ID, key.id());
    }
}

/// This hop as the forwarding headers describe it, computed once per client connection.
#[derive(Debug, Clone)]
pub struct Hop {
    /// The client's address.
    pub peer: SocketAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    forwarded_for: HeaderValue,
    forwarded: HeaderValue,
}

impl Hop {
    /// The hop for a connection from `peer`.
    pub fn new(peer: SocketAddr, proto: &'static str) -> Hop {
        let node = match peer.ip() {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        let value = |text: String| {
            HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
        };
        Hop {
            peer,
            proto,
            forwarded_for: value(peer.ip().to_string()),
            forwarded: value(format!("for={node};proto={proto}")),
        }
    }
}

/// Records this hop in `X-Forwarded-For` and `Forwarded` and sets `X-Forwarded-Proto`. The
/// client's own values are kept (and appended to) only when `trust` says a proxy we trust sits in
/// front; otherwise they are replaced, so a client cannot plant an address.
pub fn set_forwarded(headers: &mut HeaderMap, hop: &Hop, trust: bool) {
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(hop.proto),
    );
    if !trust {
        headers.insert(X_FORWARDED_FOR.clone(), hop.forwarded_for.clone());
        headers.insert(FORWARDED.clone(), hop.forwarded.clone());
        return;
    }
    for (name, ours) in [
        (&X_FORWARDED_FOR, &hop.forwarded_for),
        (&FORWARDED, &hop.forwarded),
    ] {
        let joined = match headers.get(name).and_then(|v| v.to_str().ok()) {
            Some(existing) if !existing.trim().is_empty() => {
                HeaderValue::from_str(&format!("{existing}, {}", ours.to_str().unwrap_or("")))
                    .unwrap_or_else(|_| ours.clone())
            }
            _ => ours.clone(),
        };
        headers.insert(name.clone(), joined);
    }
}

/// The client's request id when it is sane (1–128 of `[A-Za-z0-9._:-]`), else none.
pub fn client_request_id(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(&X_REQUEST_ID)?.to_str().ok()?;
    let sane = (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    sane.then_some(value)
}

/// Total size of the request headers as they would appear on the wire.
pub fn total_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn credentials_and_forged_identity_go_other_authorization_stays() {
        let mut h = HeaderMap::new();
        h.append(header::AUTHORIZATION, "Bearer k".parse().unwrap());
        h.append(header::AUTHORIZATION, "Digest abc".parse().unwrap());
        h.insert("x-api-key", "k".parse().unwrap());
        h.insert("x-portcullis-principal", "root".parse().unwrap());
        h.insert("X-Portcullis-Whatever", "1".parse().unwrap());
        h.insert("x-portcullis_principal", "root".parse().unwrap());
        h.insert("x_api_key", "k".parse().unwrap());
        strip_client_headers(&mut h, &HeaderRules::default());
        assert_eq!(h.len(), 1);
        assert_eq!(h.get(header::AUTHORIZATION).unwrap(), "Digest abc");
    }

    fn kept(names: &[&str], rules: HeaderRules) -> Vec<String> {
        let mut h = HeaderMap::new();
        for n in names {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                "1".parse().unwrap(),
            );
        }
        strip_client_headers(&mut h, &rules);
        let mut out: Vec<String> = h.keys().map(|k| k.to_string()).collect();
        out.sort();
        out
    }

    #[test]
    fn planted_headers_go_in_every_spelling() {
        let planted = [
            "x_forwarded_for",
            "x_request_id",
            "x-real-ip",
            "true-client-ip",
            "x-client-ip",
            "x-forwarded-host",
            "x-http-method-override",
            "x_http_method_override",
            "x-http-method",
            "x-method-override",
            "x-original-url",
            "x-rewrite-url",
            "some_header",
        ];
        let mut names = planted.to_vec();
        names.extend(["accept", "x-request-id", "content-type", "x-custom"]);
        let defaults = HeaderRules::default();
        assert_eq!(
            kept(&names, defaults),
            vec!["accept", "content-type", "x-custom", "x-request-id"]
        );
        let open = HeaderRules {
            underscores: true,
            method_override: false,
            trust_forwarded: true,
        };
        assert_eq!(
            kept(&names, open),
            vec![
                "accept",
                "content-type",
                "some_header",
                "true-client-ip",
                "x-client-ip",
                "x-custom",
                "x-forwarded-host",
                "x-http-method",
                "x-http-method-override",
                "x-method-override",
                "x-original-url",
                "x-real-ip",
                "x-request-id",
                "x-rewrite-url",
                "x_http_method_override",
            ],
            "only standard spellings of trusted headers, and no underscore variant of an owned one"
        );
    }

    #[test]
    fn forwarded_headers_replace_unless_trusted() {
        let hop = Hop::new("[::1]:5000".parse().unwrap(), "http");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        set_forwarded(&mut h, &hop, true);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, ::1");
        assert_eq!(h.get("forwarded").unwrap(), "for=\"[::1]\";proto=http");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        let hop = Hop::new("192.0.2.7:1".parse().unwrap(), "https");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        h.insert("forwarded", "for=127.0.0.1".parse().unwrap());
        h.insert("x-forwarded-host", "evil".parse().unwrap());
        strip_client_headers(&mut h, &HeaderRules::default());
        set_forwarded(&mut h, &hop, false);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.7");
        assert_eq!(h.get("forwarded").unwrap(), "for=192.0.2.7;proto=https");
        assert!(h.get("x-forwarded-host").is_none());
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc-123".parse().unwrap());
        assert_eq!(client_request_id(&h), Some("abc-123"));
        h.insert("x-request-id", "a b".parse().unwrap());
        assert_eq!(client_request_id(&h), None);
        h.insert("x-request-id", "a".repeat(129).parse().unwrap());
        assert_eq!(client_request_id(&h), None);
    }
}
