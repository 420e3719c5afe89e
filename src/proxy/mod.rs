//! The proxy: accept connections, decide each request, forward or answer.
//!
//! `server` accepts and serves connections (HTTP/1.1 and h2c); `service` handles one request;
//! `forward` talks to the backend; `deny` builds every answer portcullis gives itself.

pub mod admission;
pub mod body;
pub mod deny;
pub mod forward;
pub mod headers;
pub mod server;
pub mod service;

use bytes::Bytes;

/// The body type of every response the proxy sends.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;
