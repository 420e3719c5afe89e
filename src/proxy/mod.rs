//! The proxy: accept connections, decide each request, forward or answer.
//!
//! `server` accepts and serves connections (HTTP/1.1 and h2c); `service` handles one request;
//! `forward` talks to the backend; `deny` builds every answer portcullis gives itself.

pub mod admission;
pub mod body;
pub mod deny;
pub mod forward;
pub mod headers;
pub mod pool;
pub mod server;
pub mod service;

use bytes::Bytes;

/// `backend:`: what the backend might do with a request that the proxy judges literally. Every
/// default assumes the backend does it, so the proxy refuses (or judges every reading) rather
/// than guesses; describe a stricter backend to turn a rule off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendConfig {
    /// Case, `.format` suffixes and `;params`.
    pub reading: crate::path::BackendReading,
    /// Underscores, override headers and forwarding headers.
    pub headers: headers::HeaderRules,
}

/// The body type of every response the proxy sends.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;
