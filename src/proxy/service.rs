//! One request, start to finish: request id, size check, path normalisation, credential,
//! decision against one snapshot, then forward or refuse, then record (metrics, usage, log).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use hyper::body::Incoming;

use super::admission;
use super::deny::{self, Refusal};
use super::forward::{ForwardContext, Upstream};
use super::headers;
use super::BackendConfig;
use super::ProxyBody;
use crate::audit::{AuditEvent, Auditor, DecisionEvent};
use crate::clock::unix_now;
use crate::decision::{self, Reason};
use crate::identity::{Caller, TokenCaller};
use crate::keyapi::KeyApi;
use crate::keys::credential;
use crate::metrics::Metrics;
use crate::oauth::OAuth;
use crate::path;
use crate::policy::grant::Access;
use crate::policy::RouteRule;
use crate::state::{LiveState, Snapshot};

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Makes request ids: a per-process random part and a counter, unique and cheap.
pub struct RequestIds {
    boot: u32,
    next: AtomicU64,
}

impl RequestIds {
    /// A generator with a fresh random boot part.
    pub fn new() -> Self {
        RequestIds {
            boot: rand::random(),
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut text = [0u8; 24];
        let digits = (u64::from(self.boot) << 32)
            .to_be_bytes()
            .into_iter()
            .take(4)
            .chain(n.to_be_bytes());
        for (i, byte) in digits.enumerate() {
            text[2 * i] = HEX_DIGITS[usize::from(byte >> 4)];
            text[2 * i + 1] = HEX_DIGITS[usize::from(byte & 0xf)];
        }
        HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static("0"))
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything a request needs, shared by all connections.
pub struct Service {
    /// The live policy and keys.
    pub state: LiveState,
    /// The backend.
    pub upstream: Upstream,
    /// Status for a valid key without permission.
    pub deny_status: StatusCode,
    /// Largest accepted total header size.
    pub max_header_bytes: usize,
    /// Request id generator.
    pub ids: RequestIds,
    /// `http` or `https`.
    pub proto: &'static str,
    /// Where requests are counted.
    pub metrics: Metrics,
    /// One log line per request.
    pub access_log: bool,
    /// The self-service key API, when enabled.
    pub key_api: Option<Arc<KeyApi>>,
    /// Where every decision is recorded.
    pub audit: Auditor,
    /// How the backend may read requests differently (paths, headers).
    pub backend: BackendConfig,
    /// Longest pause allowed in a client's request body.
    pub body_timeout: Duration,
    /// OAuth access tokens, when `oauth:` is configured.
    pub oauth: Option<Arc<OAuth>>,
    /// Largest answer a filtered route buffers to filter (`filter_max_bytes`).
    pub filter_max_bytes: usize,
    /// The shadow policy, when `shadow_policy:` is set.
    pub shadow: Option<Arc<crate::shadow::Shadow>>,
    /// Rate-limit state of token principals (keys keep theirs beside their usage counters).
    pub token_limiters: papaya::HashMap<Box<str>, std::sync::atomic::AtomicU64>,
}

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10).
static RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
static RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

/// `"default";r=REMAINING;t=RESET`, written without a format string.
fn ratelimit_value(remaining: u64, reset: u64) -> Option<HeaderValue> {
    let (mut r, mut t) = (itoa::Buffer::new(), itoa::Buffer::new());
    let mut buf = [0u8; 64];
    let mut len = 0;
    for part in [
        b"\"default\";r=".as_slice(),
        r.format(remaining).as_bytes(),
        b";t=",
        t.format(reset).as_bytes(),
    ] {
        buf[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    HeaderValue::from_bytes(&buf[..len]).ok()
}

/// How to filter one answer: what the route names, and the caller's grants on it.
struct FilterPlan {
    filter: crate::policy::RouteFilter,
    resource: crate::policy::ResourceId,
    access: Access,
    grants: Vec<crate::policy::grant::Grant>,
}

/// What happened to a request, kept by index into its snapshot so recording allocates nothing.
#[derive(Default)]
struct Outcome {
    snapshot: Option<Arc<Snapshot>>,
    path: String,
    reason: Option<Reason>,
    route: Option<usize>,
    key: Option<u32>,
    token: Option<Arc<TokenCaller>>,
    access: Option<Access>,
    upstream_time: Option<Duration>,
    upstream_status: Option<u16>,
    key_api: bool,
    instance: Option<(usize, usize)>,
    user_agent: Option<String>,
    client: Option<SocketAddr>,
    /// Items a filtered route removed from the answer.
    filtered: Option<u64>,
    /// Why a filtered route's answer could not be filtered (and was not passed on).
    filter_error: Option<&'static str>,
    /// What the shadow policy would have decided.
    shadow: Option<crate::shadow::ShadowDecision>,
}

impl Service {
    /// Handles one request; never fails (every failure is an HTTP answer).
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        hop: Arc<headers::Hop>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let request_id = match headers::client_request_id(request.headers()) {
            Some(id) => HeaderValue::from_str(id).unwrap_or_else(|_| self.ids.next()),
            None => self.ids.next(),
        };
        let method = request.method().clone();
        let mut outcome = Outcome {
            client: Some(hop.peer),
            ..Outcome::default()
        };
        if self.audit.is_enabled() {
            outcome.user_agent = request
                .headers()
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|ua| ua.chars().take(256).collect());
        }
        let mut response = self
            .decide_and_forward(request, &hop, &request_id, &mut outcome)
            .await;
        self.record(&outcome, &method, response.status(), started, &request_id);
        response
            .headers_mut()
            .insert(headers::X_REQUEST_ID.clone(), request_id);
        response
    }

    async fn decide_and_forward(
        &self,
        request: Request<Incoming>,
        hop: &headers::Hop,
        request_id: &HeaderValue,
        outcome: &mut Outcome,
    ) -> Response<ProxyBody> {
        let rid = request_id.to_str().unwrap_or("");
        if !self.audit.accepting() {
            return deny::respond(Refusal::AuditUnavailable, self.deny_status, None, rid);
        }
        if headers::total_size(request.headers()) > self.max_header_bytes {
            return deny::respond(Refusal::HeadersTooLarge, self.deny_status, None, rid);
        }
        let (host, normalised) = match self.admit(&request) {
            Ok(admitted) => admitted,
            Err(reason) => {
                outcome.reason = Some(reason);
                outcome.path = request.uri().path().chars().take(1024).collect();
                let refusal = Refusal::Denied(reason, None);
                return deny::respond(refusal, self.deny_status, None, rid);
            }
        };
        let snapshot = self.state.load_full();
        let now = unix_now();
        let presented = credential::presented(request.headers());
        // A Bearer value that is not a key is an access token: validated (once per token, cached)
        // before the decision, which then sees its principal like a key's.
        let token = match (&presented, &self.oauth) {
            (Ok(Some(p)), Some(oauth)) if p.bearer && crate::oauth::is_token(&p.value) => {
                Some(oauth.identify(&p.value, &snapshot, now).await)
            }
            _ => None,
        };
        let identified: Result<Caller<'_>, Reason> = match (&token, &presented) {
            (Some(Ok(t)), _) => Ok(Caller::Token(t)),
            (Some(Err(reason)), _) => Err(*reason),
            (None, Err(_)) => Err(Reason::AmbiguousCredential),
            (None, Ok(None)) => Err(Reason::NoCredential),
            (None, Ok(Some(p))) => {
                decision::usable(snapshot.keys.lookup(&p.value, now)).map(Caller::Key)
            }
        };
        if let Some(api) = self.key_api.as_ref().filter(|api| api.owns(&normalised)) {
            // The key API takes API keys: a token's principal manages keys with a key.
            let caller = match identified {
                Ok(Caller::Key(k)) => Ok(k.index()),
                Ok(Caller::Token(_)) => Err(Reason::Forbidden),
                Err(reason) => Err(reason),
            };
            drop(presented);
            let api = api.clone();
            let deny_status = self.deny_status;
            return key_api_request(
                api,
                request,
                normalised,
                snapshot.clone(),
                caller,
                now,
                rid,
                outcome,
                deny_status,
            )
            .await;
        }
        let mut decision = decision::judge(
            &snapshot,
            request.method(),
            &normalised,
            &self.backend.reading,
            identified,
        );
        let body_on_bodyless =
            !admission::body_has_semantics(request.method()) && !request.body().is_end_stream();
        if decision.reason.allows()
            && body_on_bodyless
            && !decision.route.is_some_and(|r| r.allow_body)
        {
            decision.reason = Reason::BodyNotAllowed;
        }
        if let Some(shadow) = &self.shadow {
            outcome.shadow = shadow.decide(
                &snapshot,
                request.method(),
                &normalised,
                &self.backend.reading,
                decision.caller,
                decision.reason,
            );
            if outcome
                .shadow
                .is_some_and(|s| s.allow != decision.reason.allows())
            {
                shadow.mismatch(decision.route.map_or("", |r| &*r.template));
            }
        }
        outcome.reason = Some(decision.reason);
        outcome.route = decision.route.map(|r| r.index);
        outcome.key = decision.key().map(|k| k.index());
        outcome.token = token.clone().and_then(Result::ok);
        outcome.access = decision.access;
        outcome.instance = decision.instance.map(|i| {
            let start = i.as_ptr() as usize - normalised.as_ptr() as usize;
            (start, start + i.len())
        });
        if let Some(key) = decision.key() {
            key.usage().record(now);
        }
        if !decision.reason.allows() {
            let resource = match decision.route.map(|r| &r.rule) {
                Some(RouteRule::Protected { resource, .. }) => {
                    Some(snapshot.policy.resource_name(*resource))
                }
                _ => None,
            };
            let refusal = match (decision.reason, decision.caller) {
                (Reason::Forbidden, Some(Caller::Token(_))) => {
                    Refusal::TokenForbidden(decision.access)
                }
                (reason, _) => Refusal::Denied(reason, decision.access),
            };
            let response = deny::respond(refusal, self.deny_status, resource, rid);
            outcome.path = normalised;
            outcome.snapshot = Some(snapshot);
            return response;
        }
        // Rate limits: after the decision, so refused and unauthenticated requests spend no
        // budget, and per key, so another key's flood never touches this one's.
        let mut rate_headers = None;
        if let (Reason::Granted, Some(caller)) = (decision.reason, decision.caller) {
            if let Some(rate) = caller.principal().limit {
                let now_ns = crate::limits::now_ns();
                let verdict = match caller {
                    Caller::Key(k) => crate::limits::take(&k.usage().limiter, rate, now_ns),
                    Caller::Token(t) => {
                        let limiters = self.token_limiters.pin();
                        let state = limiters.get_or_insert_with(t.principal.name.clone(), || {
                            std::sync::atomic::AtomicU64::new(0)
                        });
                        crate::limits::take(state, rate, now_ns)
                    }
                };
                let policy = caller.principal().limit_header.clone();
                match verdict {
                    crate::limits::Verdict::Allow { remaining, reset } => {
                        rate_headers = ratelimit_value(remaining, reset);
                    }
                    crate::limits::Verdict::Deny { retry_after } => {
                        outcome.reason = Some(Reason::RateLimited);
                        let route = decision.route.map_or("", |r| &*r.template);
                        self.metrics
                            .rate_limited
                            .with_label_values(&[caller.principal().kind.as_str(), route])
                            .inc();
                        outcome.path = normalised;
                        let mut response =
                            deny::respond(Refusal::RateLimited, self.deny_status, None, rid);
                        let h = response.headers_mut();
                        h.insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
                        if let Some(policy) = policy {
                            h.insert(RATELIMIT_POLICY.clone(), policy);
                        }
                        if let Ok(v) =
                            HeaderValue::from_str(&format!("\"default\";r=0;t={retry_after}"))
                        {
                            h.insert(RATELIMIT.clone(), v);
                        }
                        outcome.snapshot = Some(snapshot.clone());
                        return response;
                    }
                }
            }
        }
        let filtered_route = decision.route.and_then(|r| r.filter.as_ref());
        let plan = match (
            decision.filter,
            filtered_route,
            decision.route.map(|r| &r.rule),
        ) {
            (
                true,
                Some(filter),
                Some(RouteRule::Protected {
                    resource, access, ..
                }),
            ) => Some(FilterPlan {
                filter: filter.clone(),
                resource: *resource,
                access: *access,
                grants: decision
                    .caller
                    .map_or_else(Vec::new, |c| c.grants().to_vec()),
            }),
            _ => None,
        };
        let ctx = ForwardContext {
            path: &normalised,
            caller: decision.caller,
            hop,
            request_id,
            host,
            rules: self.backend.headers,
            body_timeout: self.body_timeout,
            close_after: body_on_bodyless,
            uncompressed: filtered_route.is_some(),
        };
        drop(presented);
        let sent = Instant::now();
        let result = self.upstream.forward(request, ctx).await;
        outcome.upstream_time = Some(sent.elapsed());
        outcome.path = normalised;
        outcome.snapshot = Some(snapshot);
        match result {
            Ok(mut response) => {
                outcome.upstream_status = Some(response.status().as_u16());
                // Allowed answers say what is left (`RateLimit`); the policy itself is stated on
                // the 429 (SPEC asks `RateLimit` of allowed answers), which keeps the limiter's
                // cost per allowed request near 3 %.
                if let Some(now) = rate_headers {
                    response.headers_mut().insert(RATELIMIT.clone(), now);
                }
                match plan {
                    None => response,
                    Some(plan) => {
                        self.filtered(response, plan, outcome, request_id, rid)
                            .await
                    }
                }
            }
            Err(refusal) => {
                let kind = match refusal {
                    Refusal::UpstreamTimeout => Some("timeout"),
                    Refusal::UpstreamUnreachable => Some("connect"),
                    _ => None,
                };
                if let Some(kind) = kind {
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[kind])
                        .inc();
                }
                deny::respond(refusal, self.deny_status, None, rid)
            }
        }
    }

    /// The answer of a filtered route, with only the items the caller may read; a 502 when it
    /// cannot be filtered safely, never the unfiltered body.
    async fn filtered(
        &self,
        response: Response<ProxyBody>,
        plan: FilterPlan,
        outcome: &mut Outcome,
        request_id: &HeaderValue,
        rid: &str,
    ) -> Response<ProxyBody> {
        use crate::policy::filter::{self, FilterError};
        use http_body_util::BodyExt;
        if !response.status().is_success() {
            return response;
        }
        let route = outcome
            .snapshot
            .as_deref()
            .zip(outcome.route)
            .and_then(|(s, i)| s.policy.routes().get(i))
            .map_or("", |r| &*r.template)
            .to_string();
        let result: Result<(Response<ProxyBody>, usize), FilterError> = async {
            let compressed = response
                .headers()
                .get(http::header::CONTENT_ENCODING)
                .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"));
            if compressed {
                return Err(FilterError::Compressed);
            }
            let (mut parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, self.filter_max_bytes)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        FilterError::TooLarge
                    } else {
                        FilterError::Unreadable
                    }
                })?
                .to_bytes();
            let (grants, resource, access) = (&plan.grants, plan.resource, plan.access);
            let (kept, removed) = filter::filter(
                &body,
                &plan.filter.items,
                &plan.filter.instance,
                |instance| crate::policy::grant::item_allowed(grants, resource, instance, access),
            )?;
            for name in [
                http::header::ETAG,
                http::header::CONTENT_LENGTH,
                http::header::TRANSFER_ENCODING,
            ] {
                parts.headers.remove(name);
            }
            parts.headers.remove("content-md5");
            parts
                .headers
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(kept.len()));
            let body = http_body_util::Full::new(bytes::Bytes::from(kept))
                .map_err(|never| match never {})
                .boxed_unsync();
            Ok((Response::from_parts(parts, body), removed))
        }
        .await;
        match result {
            Ok((response, removed)) => {
                outcome.filtered = Some(removed as u64);
                self.metrics
                    .filtered_items
                    .with_label_values(&[&route])
                    .inc_by(removed as u64);
                response
            }
            Err(e) => {
                outcome.filter_error = Some(e.as_str());
                self.metrics
                    .filter_failures
                    .with_label_values(&[&route, e.as_str()])
                    .inc();
                tracing::warn!(
                    route,
                    reason = e.as_str(),
                    request_id = request_id.to_str().unwrap_or(""),
                    "answer could not be filtered; 502 instead"
                );
                deny::respond(Refusal::FilterFailed(e), self.deny_status, None, rid)
            }
        }
    }

    /// The checks before any decision: one sane host, a path that normalises under the
    /// backend's rules, no method override in the query. Returns the host to forward and the
    /// normalised path.
    fn admit(&self, request: &Request<Incoming>) -> Result<(Option<HeaderValue>, String), Reason> {
        let host =
            admission::host(request.uri(), request.headers()).map_err(|_| Reason::BadRequest)?;
        let normalised =
            path::normalise_for(request.uri().path(), &self.backend.reading).map_err(|e| {
                tracing::debug!(error = %e, "refused path");
                Reason::BadPath
            })?;
        if self.backend.headers.method_override
            && admission::has_method_override_parameter(request.uri().query())
        {
            return Err(Reason::MethodOverride);
        }
        Ok((host, normalised))
    }

    fn record(
        &self,
        outcome: &Outcome,
        method: &Method,
        status: StatusCode,
        started: Instant,
        request_id: &HeaderValue,
    ) {
        let elapsed = started.elapsed();
        let snapshot = outcome.snapshot.as_deref();
        let route = snapshot.and_then(|s| outcome.route.and_then(|i| s.policy.routes().get(i)));
        let resource = match (snapshot, route.map(|r| &r.rule)) {
            (Some(s), Some(RouteRule::Protected { resource, .. })) => {
                s.policy.resource_name(*resource)
            }
            _ if outcome.key_api => crate::policy::API_KEYS_RESOURCE,
            _ => "",
        };
        let reason = outcome
            .reason
            .map_or_else(|| unreasoned(status, outcome.key_api), Reason::as_str);
        let decision = if outcome.reason.is_some_and(Reason::allows) {
            "allow"
        } else {
            "deny"
        };
        let access = outcome.access.map_or("", Access::as_str);
        self.metrics
            .requests
            .with_label_values(&[decision, reason, resource, access, status.as_str()])
            .inc();
        self.metrics.request_duration.observe(elapsed.as_secs_f64());
        let upstream = outcome.upstream_time.unwrap_or_default();
        if outcome.upstream_time.is_some() {
            self.metrics
                .upstream_duration
                .observe(upstream.as_secs_f64());
        }
        self.metrics
            .overhead_duration
            .observe(elapsed.saturating_sub(upstream).as_secs_f64());
        let key = snapshot.and_then(|s| outcome.key.and_then(|i| s.keys.get(i)));
        if let (Some(per_key), Some(key)) = (&self.metrics.per_key, key) {
            per_key.requests.with_label_values(&[&key.id()]).inc();
            per_key
                .last_used
                .with_label_values(&[&key.id()])
                .set(unix_now() as f64);
        }
        if self.audit.is_enabled() {
            self.audit.record(AuditEvent::Decision(decision_event(
                outcome, method, status, elapsed, request_id, route, resource, key,
            )));
        }
        if self.access_log {
            tracing::info!(
                target: "portcullis::access",
                request_id = request_id.to_str().unwrap_or(""),
                method = method.as_str(),
                path = &*crate::keys::secret::mask_in_path(&outcome.path),
                route = route.map_or("", |r| &*r.template),
                decision,
                reason,
                status = status.as_u16(),
                key_id = key.map_or("", |k| k.id()),
                duration_us = elapsed.as_micros() as u64,
            );
        }
    }
}

/// The reason recorded for answers given before any decision was made.
fn unreasoned(status: StatusCode, key_api: bool) -> &'static str {
    match status {
        // The key API answers 503 when its store (PostgreSQL) cannot take a change.
        StatusCode::SERVICE_UNAVAILABLE if key_api => "store_unavailable",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
        StatusCode::SERVICE_UNAVAILABLE => "audit_unavailable",
        StatusCode::BAD_REQUEST => "bad_body",
        StatusCode::REQUEST_TIMEOUT => "body_timeout",
        _ => "refused",
    }
}

/// The audit record of one decision.
#[allow(clippy::too_many_arguments)]
fn decision_event(
    outcome: &Outcome,
    method: &Method,
    status: StatusCode,
    elapsed: Duration,
    request_id: &HeaderValue,
    route: Option<&crate::policy::Route>,
    resource: &str,
    key: Option<crate::keys::Key<'_>>,
) -> DecisionEvent {
    let token = outcome.token.as_deref();
    DecisionEvent {
        request_id: request_id.to_str().unwrap_or("").to_string(),
        allow: outcome.reason.is_some_and(Reason::allows),
        reason: outcome
            .reason
            .map_or_else(|| unreasoned(status, outcome.key_api), Reason::as_str),
        status: status.as_u16(),
        method: method.as_str().to_string(),
        path: crate::keys::secret::mask_in_path(&outcome.path).into_owned(),
        route: route.map(|r| r.template.to_string()),
        resource: (!resource.is_empty()).then(|| resource.to_string()),
        instance: outcome
            .instance
            .and_then(|(a, b)| outcome.path.get(a..b))
            .map(|i| crate::keys::secret::mask_in_path(i).into_owned()),
        access: outcome.access.map(Access::as_str),
        key_id: key.map(|k| k.id().to_string()),
        key_prefix: key.map(|k| k.prefix().to_string()),
        principal: key
            .map(|k| k.principal())
            .or(token.map(|t| &t.principal))
            .map(|p| p.name.to_string()),
        principal_kind: key
            .map(|k| k.principal())
            .or(token.map(|t| &t.principal))
            .map(|p| p.kind.as_str()),
        credential: if key.is_some() {
            Some("key")
        } else {
            token.map(|_| "oauth")
        },
        issuer: token.map(|t| t.issuer.to_string()),
        client_id: token.and_then(|t| t.client_id.as_deref().map(str::to_string)),
        client_ip: outcome.client.map_or(String::new(), |c| c.ip().to_string()),
        user_agent: outcome.user_agent.clone(),
        upstream_status: outcome.upstream_status,
        filtered: outcome.filtered,
        filter_error: outcome.filter_error,
        shadow_decision: outcome
            .shadow
            .map(|s| if s.allow { "allow" } else { "deny" }),
        shadow_reason: outcome.shadow.map(|s| s.reason.as_str()),
        duration_us: elapsed.as_micros() as u64,
    }
}

/// A request under the key API prefix: authenticated like any request, never forwarded.
#[allow(clippy::too_many_arguments)]
async fn key_api_request(
    api: Arc<KeyApi>,
    request: Request<Incoming>,
    path: String,
    snapshot: Arc<Snapshot>,
    caller: Result<u32, Reason>,
    now: i64,
    request_id: &str,
    outcome: &mut Outcome,
    deny_status: StatusCode,
) -> Response<ProxyBody> {
    outcome.key_api = true;
    let caller = match caller {
        Ok(index) => index,
        Err(reason) => {
            outcome.reason = Some(reason);
            outcome.path = path;
            return deny::respond(Refusal::Denied(reason, None), deny_status, None, request_id);
        }
    };
    if let Some(key) = snapshot.keys.get(caller) {
        key.usage().record(now);
    }
    outcome.key = Some(caller);
    outcome.snapshot = Some(snapshot.clone());
    let handled = api
        .handle(request, &path, snapshot, caller, request_id)
        .await;
    // 403 is a permission decision; other errors (400, 404, 409, 413) are recorded by status.
    let status = handled.response.status();
    outcome.reason = if handled.forbidden {
        Some(Reason::Forbidden)
    } else if status.is_client_error() || status.is_server_error() {
        None
    } else {
        Some(Reason::Granted)
    };
    outcome.path = path;
    handled.response
}
