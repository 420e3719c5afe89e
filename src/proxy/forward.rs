//! Sending an allowed request to the backend and relaying its answer, bodies streamed both ways.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::body::{BodyFault, ClientBody};
use super::deny::Refusal;
use super::headers::{self, HeaderRules};
use super::pool::Pool;
use super::ProxyBody;
use crate::identity::Caller;

/// The pooled keep-alive client to the backend.
pub struct Upstream {
    client: Sender,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    timeout: Duration,
}

/// How requests reach the backend: a plain-`http` backend (the sidecar case) through the
/// proxy's own HTTP/1.1 pool; an `https` one through hyper-util's client (TLS, ALPN, HTTP/2).
enum Sender {
    Plain(Pool),
    Tls(Box<Client<HttpsConnector<HttpConnector>, ClientBody>>),
}

impl Sender {
    async fn send(
        &self,
        request: Request<ClientBody>,
    ) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
        match self {
            Sender::Plain(pool) => Ok(pool.send(request).await?),
            Sender::Tls(client) => Ok(client.request(request).await?),
        }
    }
}

/// What the forwarder needs to know about the request besides the request itself.
pub struct ForwardContext<'a> {
    /// The normalised path, which is what the backend receives.
    pub path: &'a str,
    /// The identified caller, if any.
    pub caller: Option<Caller<'a>>,
    /// The client connection as the forwarding headers describe it.
    pub hop: &'a headers::Hop,
    /// The request id to pass on.
    pub request_id: &'a HeaderValue,
    /// The `Host` to send: the client's (checked by admission), or the upstream's when absent.
    pub host: Option<HeaderValue>,
    /// Which client headers the backend must not see.
    pub rules: HeaderRules,
    /// Longest pause allowed in the client's body.
    pub body_timeout: Duration,
    /// Ask the backend to close the connection after this request: a body on a method without
    /// body semantics (allowed by the route) must not be able to turn into a next request.
    pub close_after: bool,
    /// Ask the backend for an uncompressed answer (a filtered route reads it).
    pub uncompressed: bool,
}

impl Upstream {
    /// A client for `base` (scheme and authority only).
    pub fn new(
        base: &Uri,
        connect_timeout: Duration,
        timeout: Duration,
        tls: Option<rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        http.enforce_http(false);
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match tls {
            Some(config) => builder.with_tls_config(config),
            None => builder.with_tls_config(
                crate::tls::upstream_client_config(None).map_err(anyhow::Error::msg)?,
            ),
        };
        let connector = builder
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let parts = base.clone().into_parts();
        let scheme = parts
            .scheme
            .ok_or_else(|| anyhow::anyhow!("upstream has no scheme"))?;
        let authority = parts
            .authority
            .ok_or_else(|| anyhow::anyhow!("upstream has no host"))?;
        let client = if scheme == http::uri::Scheme::HTTP {
            Sender::Plain(Pool::new(authority.clone(), connect_timeout))
        } else {
            Sender::Tls(Box::new(
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(60))
                    .pool_max_idle_per_host(1024)
                    .build(connector),
            ))
        };
        Ok(Upstream {
            client,
            scheme,
            authority,
            timeout,
        })
    }

    /// Forwards the request; returns the backend's response or the refusal to answer with.
    pub async fn forward(
        &self,
        mut request: Request<Incoming>,
        ctx: ForwardContext<'_>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        // Only WebSocket is tunnelled; other protocols (h2c, TLS) are not upgraded through us.
        let wants_upgrade = request.version() == Version::HTTP_11
            && request
                .headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
            && connection_has_upgrade(request.headers());
        let client_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        parts.uri = self.target(ctx.path, &parts.uri);
        let host = ctx
            .host
            .or_else(|| HeaderValue::from_str(self.authority.as_str()).ok());
        if let Some(host) = host {
            parts.headers.insert(header::HOST, host);
        }
        parts.version = Version::HTTP_11;
        headers::strip_hop_by_hop(&mut parts.headers, wants_upgrade);
        headers::strip_client_headers(&mut parts.headers, &ctx.rules);
        if let Some(caller) = ctx.caller {
            headers::set_identity(&mut parts.headers, caller);
        }
        headers::set_forwarded(&mut parts.headers, ctx.hop, ctx.rules.trust_forwarded);
        parts
            .headers
            .insert(headers::X_REQUEST_ID.clone(), ctx.request_id.clone());
        if ctx.uncompressed {
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if ctx.close_after {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let (body, fault) = ClientBody::new(body, ctx.body_timeout);
        let outbound = Request::from_parts(parts, body);
        let mut response =
            match tokio::time::timeout(self.timeout, self.client.send(outbound)).await {
                Err(_) => return Err(Refusal::UpstreamTimeout),
                Ok(Err(e)) => {
                    // The client's own body failing is the client's fault, not the backend's.
                    match fault.and_then(|f| f.get()) {
                        Some(BodyFault::Broken) => return Err(Refusal::BrokenBody),
                        Some(BodyFault::Stalled) => return Err(Refusal::StalledBody),
                        None => {}
                    }
                    tracing::warn!(
                        upstream = %self.authority,
                        request_id = ctx.request_id.to_str().unwrap_or(""),
                        error = %crate::tls::explain_tls_failure(&*e, crate::tls::TlsPeer::Upstream)
                            .unwrap_or_else(|| error_chain(&*e)),
                        "upstream request failed"
                    );
                    return Err(Refusal::UpstreamUnreachable);
                }
                Ok(Ok(r)) => r,
            };
        let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        match (upgraded, client_upgrade) {
            (true, Some(client_side)) => {
                let backend_side = hyper::upgrade::on(&mut response);
                tokio::spawn(splice(client_side, backend_side));
            }
            _ => headers::strip_hop_by_hop(response.headers_mut(), false),
        }
        Ok(response.map(|b| b.boxed_unsync()))
    }

    /// The upstream URI: the backend's scheme and authority, the normalised path and the
    /// client's query. When normalisation changed nothing, the client's bytes are reused.
    fn target(&self, path: &str, original: &Uri) -> Uri {
        let path_and_query = match original.path_and_query() {
            Some(pq) if pq.path() == path => Some(pq.clone()),
            _ => {
                let text = match original.query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_string(),
                };
                text.parse().ok()
            }
        };
        let mut parts = http::uri::Parts::default();
        // hyper-util's client turns an absolute URI into the origin form itself; a pooled
        // HTTP/1 connection sends what it is given, so it gets the origin form.
        if matches!(self.client, Sender::Tls(_)) {
            parts.scheme = Some(self.scheme.clone());
            parts.authority = Some(self.authority.clone());
        }
        parts.path_and_query = path_and_query;
        Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
    }
}

fn connection_has_upgrade(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Copies bytes both ways between an upgraded client connection and backend connection.
async fn splice(client: hyper::upgrade::OnUpgrade, backend: hyper::upgrade::OnUpgrade) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(error = %e, "connection upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut backend = TokioIo::new(backend);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
