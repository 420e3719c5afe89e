//! The one place that turns a denial or a proxy failure into an HTTP answer.
//!
//! The client gets a generic RFC 9457 problem body; the precise reason goes to the audit event.
//! Bodies never name keys, principals or grants.

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::BodyExt;

use super::ProxyBody;
use crate::decision::Reason;
use crate::policy::grant::Access;

/// Why portcullis answers a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A decision said no.
    Denied(Reason, Option<Access>),
    /// An OAuth access token lacks the access (the same answer, worded for a token).
    TokenForbidden(Option<Access>),
    /// Request headers larger than configured.
    HeadersTooLarge,
    /// The backend could not be reached.
    UpstreamUnreachable,
    /// The backend did not answer in time.
    UpstreamTimeout,
    /// `audit.fail_closed` is set and audit events cannot be kept.
    AuditUnavailable,
    /// The client's request body was malformed or cut short (a broken chunk).
    BrokenBody,
    /// The client paused its request body for longer than `connections.body_timeout`.
    StalledBody,
    /// The caller is over its rate limit.
    RateLimited,
    /// A filtered route's answer could not be filtered, so it is not passed on.
    FilterFailed(crate::policy::filter::FilterError),
}

struct Problem {
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: String,
}

fn describe(refusal: Refusal, deny_status: StatusCode, resource: Option<&str>) -> Problem {
    let (status, slug, title, detail) = match refusal {
        Refusal::Denied(Reason::BadPath, _) => (
            StatusCode::BAD_REQUEST,
            "bad-path",
            "Bad request path",
            "The request path cannot be normalised safely: it has invalid percent-encoding, an encoded '/' or '\\', a NUL, a ';', or a character outside printable ASCII (percent-encode it).".to_string(),
        ),
        Refusal::Denied(Reason::BadRequest, _) => (
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            "The request names more than one host, or an invalid one: send one Host header that agrees with the request target.".to_string(),
        ),
        Refusal::Denied(Reason::MethodOverride, _) => (
            StatusCode::BAD_REQUEST,
            "method-override",
            "Bad request",
            "A '_method' query parameter is not accepted: send the request with the method you mean.".to_string(),
        ),
        Refusal::Denied(Reason::BodyNotAllowed, _) => (
            StatusCode::BAD_REQUEST,
            "body-not-allowed",
            "Bad request",
            "This method takes no request body here: send the request without one.".to_string(),
        ),
        Refusal::Denied(Reason::AmbiguousPath, _) => (
            deny_status,
            "ambiguous-path",
            "Forbidden",
            "The service behind this gateway could read this path as another route, which this API key may not use. Send the path exactly as the API documents it.".to_string(),
        ),
        Refusal::Denied(Reason::AmbiguousCredential, _) => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            "The request carries more than one different credential, or a malformed one. Send exactly one: 'Authorization: Bearer <key>', 'X-API-Key: <key>', or HTTP Basic with the key as the password (or as the user name with an empty password, as in curl -u KEY:).".to_string(),
        ),
        Refusal::Denied(Reason::InvalidToken, _) => (
            StatusCode::UNAUTHORIZED,
            "invalid-token",
            "Unauthorized",
            "The access token is not valid: its signature, issuer, audience, algorithm or validity period was not accepted.".to_string(),
        ),
        Refusal::Denied(Reason::UnknownPrincipal, _) => (
            deny_status,
            "forbidden",
            "Forbidden",
            "The access token is valid but names no one this API knows.".to_string(),
        ),
        Refusal::Denied(reason, _) if reason.is_unauthenticated() => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            "A valid API key is required: it is missing, unknown, inactive or expired. Send it as 'Authorization: Bearer <key>', 'X-API-Key: <key>', or HTTP Basic with the key as the password (or as the user name: curl -u KEY:).".to_string(),
        ),
        Refusal::Denied(Reason::Forbidden, access) => (
            deny_status,
            "forbidden",
            "Forbidden",
            match (access, resource) {
                (Some(a), Some(r)) => format!("This API key does not have {a} access to {r}."),
                _ => "This API key may not make this request.".to_string(),
            },
        ),
        Refusal::RateLimited => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too Many Requests",
            "This key is over its rate limit; try again after the number of seconds in Retry-After.".to_string(),
        ),
        Refusal::FilterFailed(e) => (
            StatusCode::BAD_GATEWAY,
            "filter-failed",
            "Bad Gateway",
            format!(
                "The backend's answer could not be filtered to what this caller may read ({}), so it is not passed on.",
                e.as_str()
            ),
        ),
        Refusal::TokenForbidden(access) => (
            deny_status,
            "forbidden",
            "Forbidden",
            match (access, resource) {
                (Some(a), Some(r)) => {
                    format!("This access token does not have {a} access to {r}.")
                }
                _ => "This access token may not make this request.".to_string(),
            },
        ),
        Refusal::Denied(_, _) => (
            deny_status,
            "forbidden",
            "Forbidden",
            "No rule allows this request with this API key.".to_string(),
        ),
        Refusal::HeadersTooLarge => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "Request header fields too large",
            "The request headers are larger than this service accepts.".to_string(),
        ),
        Refusal::UpstreamUnreachable => (
            StatusCode::BAD_GATEWAY,
            "bad-gateway",
            "Bad gateway",
            "The service behind this gateway could not be reached.".to_string(),
        ),
        Refusal::AuditUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            "Requests are refused while the audit trail cannot be recorded. Try again shortly.".to_string(),
        ),
        Refusal::BrokenBody => (
            StatusCode::BAD_REQUEST,
            "broken-body",
            "Bad request",
            "The request body was malformed or ended early.".to_string(),
        ),
        Refusal::StalledBody => (
            StatusCode::REQUEST_TIMEOUT,
            "body-timeout",
            "Request timeout",
            "The request body stopped arriving.".to_string(),
        ),
        Refusal::UpstreamTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "gateway-timeout",
            "Gateway timeout",
            "The service behind this gateway did not answer in time.".to_string(),
        ),
    };
    Problem {
        status,
        slug,
        title,
        detail,
    }
}

/// Builds the answer for a refusal. `resource` is the matched route's resource, shown only in a
/// `forbidden` detail so the client knows what access it lacks.
pub fn respond(
    refusal: Refusal,
    deny_status: StatusCode,
    resource: Option<&str>,
    request_id: &str,
) -> Response<ProxyBody> {
    let problem = describe(refusal, deny_status, resource);
    let body = serde_json::json!({
        "type": format!("https://portcullis.dev/problems/{}", problem.slug),
        "title": problem.title,
        "status": problem.status.as_u16(),
        "detail": problem.detail,
        "request_id": request_id,
    });
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = problem.status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if matches!(refusal, Refusal::Denied(Reason::InvalidToken, _)) {
        // RFC 6750 §3: the token was presented and refused.
        headers.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(
                "Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\"The access token is not valid\"",
            ),
        );
    } else if problem.status == StatusCode::UNAUTHORIZED {
        headers.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"portcullis\""),
        );
        headers.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"portcullis\", charset=\"UTF-8\""),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn body_json(response: Response<ProxyBody>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn unauthenticated_is_401_with_challenge() {
        let r = respond(
            Refusal::Denied(Reason::ExpiredKey, None),
            StatusCode::FORBIDDEN,
            None,
            "rid",
        );
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().get(WWW_AUTHENTICATE).is_some());
        let json = body_json(r).await;
        assert_eq!(json["status"], 401);
        assert_eq!(json["request_id"], "rid");
    }

    #[tokio::test]
    async fn forbidden_uses_deny_status() {
        let r = respond(
            Refusal::Denied(Reason::Forbidden, Some(Access::Write)),
            StatusCode::UNAUTHORIZED,
            Some("datasets"),
            "x",
        );
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let json = body_json(r).await;
        assert_eq!(
            json["detail"],
            "This API key does not have write access to datasets."
        );
        let r = respond(
            Refusal::Denied(Reason::BadPath, None),
            StatusCode::FORBIDDEN,
            None,
            "x",
        );
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
}
