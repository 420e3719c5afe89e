//! One request, start to finish: request id, size check, path normalisation, credential,
//! decision against one snapshot, then forward or refuse.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::deny::{self, Refusal};
use super::forward::{ForwardContext, Upstream};
use super::headers;
use super::ProxyBody;
use crate::decision::{self, Reason};
use crate::keys::credential;
use crate::path;
use crate::policy::RouteRule;
use crate::state::LiveState;

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
        let text = format!("{:08x}{:016x}", self.boot, n);
        HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("0"))
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
}

impl Service {
    /// Handles one request; never fails (every failure is an HTTP answer).
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ProxyBody> {
        let request_id = match headers::client_request_id(request.headers()) {
            Some(id) => HeaderValue::from_str(id).unwrap_or_else(|_| self.ids.next()),
            None => self.ids.next(),
        };
        let mut response = self.decide_and_forward(request, client, &request_id).await;
        response
            .headers_mut()
            .insert(headers::X_REQUEST_ID.clone(), request_id);
        response
    }

    async fn decide_and_forward(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
        request_id: &HeaderValue,
    ) -> Response<ProxyBody> {
        let rid = request_id.to_str().unwrap_or("");
        if headers::total_size(request.headers()) > self.max_header_bytes {
            return deny::respond(Refusal::HeadersTooLarge, self.deny_status, None, rid);
        }
        let normalised = match path::normalise(request.uri().path()) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "refused path");
                let refusal = Refusal::Denied(Reason::BadPath, None);
                return deny::respond(refusal, self.deny_status, None, rid);
            }
        };
        let snapshot = self.state.load_full();
        let now = unix_now();
        let credential = credential::extract(request.headers());
        let credential_ref = match &credential {
            Ok(c) => Ok(c.as_deref()),
            Err(e) => Err(*e),
        };
        let decision = decision::decide(
            &snapshot,
            request.method(),
            &normalised,
            credential_ref,
            now,
        );
        if !decision.reason.allows() {
            let resource = match decision.route.map(|r| &r.rule) {
                Some(RouteRule::Protected { resource, .. }) => {
                    Some(snapshot.policy.resource_name(*resource))
                }
                _ => None,
            };
            let refusal = Refusal::Denied(decision.reason, decision.access);
            return deny::respond(refusal, self.deny_status, resource, rid);
        }
        let ctx = ForwardContext {
            path: &normalised,
            key: decision.key,
            client,
            proto: self.proto,
            request_id,
        };
        drop(credential);
        match self.upstream.forward(request, ctx).await {
            Ok(response) => response,
            Err(refusal) => deny::respond(refusal, self.deny_status, None, rid),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
