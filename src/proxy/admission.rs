//! Admission: the shape a request must have before it is judged, so the backend can never read
//! it as something else. Pure checks on the request head; each refusal names its reason.
//!
//! - one `Host`, agreeing with the target's authority (absolute-form, HTTP/2 `:authority`);
//! - no `_method` query parameter when the backend may honour method overrides;
//! - no body on a method without body semantics (RFC 9110 §9.3.1), unless the route allows one:
//!   a backend that ignores a GET body reads those bytes as the next request on the connection.

use http::header::{HeaderMap, HeaderValue, HOST};
use http::uri::Authority;
use http::{Method, Uri};

/// Why a request head is refused before any decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Inadmissible {
    /// More than one `Host` header (RFC 9112 §3.2 requires 400).
    #[error("more than one Host header")]
    DuplicateHost,
    /// A `Host` that is not a valid authority.
    #[error("the Host header is not a valid host[:port]")]
    BadHost,
    /// An absolute-form target or HTTP/2 `:authority` naming another host than `Host`.
    #[error("the request names two different hosts")]
    ConflictingHost,
}

/// The host the request is for, as the backend will receive it in `Host`: the authority of an
/// absolute-form target or of HTTP/2's `:authority`, else the single `Host` header.
pub fn host(uri: &Uri, headers: &HeaderMap) -> Result<Option<HeaderValue>, Inadmissible> {
    let mut hosts = headers.get_all(HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(Inadmissible::DuplicateHost);
    }
    let named = match header {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|t| t.parse::<Authority>().ok())
                .filter(|a| !a.host().is_empty() && !a.as_str().contains('@'))
                .ok_or(Inadmissible::BadHost)?,
        ),
        None => None,
    };
    match (uri.authority(), named) {
        (Some(target), Some(named)) if !same_authority(target, &named) => {
            Err(Inadmissible::ConflictingHost)
        }
        (Some(target), _) => Ok(HeaderValue::from_str(target.as_str()).ok()),
        (None, Some(_)) => Ok(header.cloned()),
        (None, None) => Ok(None),
    }
}

/// Host names compare without case; ports must agree (a missing port equals none).
fn same_authority(a: &Authority, b: &Authority) -> bool {
    a.host().eq_ignore_ascii_case(b.host()) && a.port_u16() == b.port_u16()
}

/// Whether the query carries `_method` (any case, percent-encoded or not): Laravel, Symfony,
/// Express `method-override` and Rails read it as the method to perform.
pub fn has_method_override_parameter(query: Option<&str>) -> bool {
    let Some(query) = query else { return false };
    query
        .split(['&', ';'])
        .map(|pair| pair.split('=').next().unwrap_or(""))
        .any(|name| {
            let name = name.replace("%5F", "_").replace("%5f", "_");
            name.eq_ignore_ascii_case("_method")
        })
}

/// Methods whose request content has no defined meaning (RFC 9110 §9.3): a body on them is
/// refused unless the route says the backend reads it.
pub fn body_has_semantics(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(hosts: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in hosts {
            h.append(HOST, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn one_host_and_it_must_agree_with_the_target() {
        let origin: Uri = "/x".parse().unwrap();
        assert_eq!(host(&origin, &headers(&["api"])).unwrap().unwrap(), "api");
        assert_eq!(host(&origin, &headers(&[])).unwrap(), None);
        assert_eq!(
            host(&origin, &headers(&["a", "b"])),
            Err(Inadmissible::DuplicateHost)
        );
        assert_eq!(
            host(&origin, &headers(&["a", "a"])),
            Err(Inadmissible::DuplicateHost)
        );
        assert_eq!(
            host(&origin, &headers(&["a b"])),
            Err(Inadmissible::BadHost)
        );
        assert_eq!(
            host(&origin, &headers(&["user@a"])),
            Err(Inadmissible::BadHost)
        );
        let absolute: Uri = "http://API:80/x".parse().unwrap();
        assert_eq!(
            host(&absolute, &headers(&["api:80"])).unwrap().unwrap(),
            "API:80"
        );
        assert_eq!(
            host(&absolute, &headers(&["other"])),
            Err(Inadmissible::ConflictingHost)
        );
        assert_eq!(
            host(&absolute, &headers(&["api"])),
            Err(Inadmissible::ConflictingHost),
            "a port on one side only is another authority"
        );
        assert_eq!(host(&absolute, &headers(&[])).unwrap().unwrap(), "API:80");
    }

    #[test]
    fn method_override_parameters_in_every_spelling() {
        for q in [
            "_method=DELETE",
            "a=1&_METHOD=put",
            "%5Fmethod=x",
            "x;_method",
            "_method",
        ] {
            assert!(has_method_override_parameter(Some(q)), "{q}");
        }
        for q in ["method=DELETE", "a=_method", "x_method=1", ""] {
            assert!(!has_method_override_parameter(Some(q)), "{q}");
        }
        assert!(!has_method_override_parameter(None));
    }

    #[test]
    fn bodies_belong_to_post_put_and_patch() {
        for m in [Method::POST, Method::PUT, Method::PATCH] {
            assert!(body_has_semantics(&m));
        }
        for m in [Method::GET, Method::HEAD, Method::DELETE, Method::OPTIONS] {
            assert!(!body_has_semantics(&m));
        }
    }
}
