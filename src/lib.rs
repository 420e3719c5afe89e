//! portcullis: an API-key enforcement sidecar.
//!
//! Flow of one request: `proxy::server` (accept) → `proxy::service` (one request) → `path`
//! (normalise) → `state` snapshot → `keys` (who is this?) → `policy` (may they?) → `decision`
//! → `proxy::forward` (to the backend) or `proxy::deny` (401/403/400 body).

pub mod admin;
pub mod app;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod decision;
pub mod demo;
pub mod diagnostic;
pub mod identity;
pub mod inject;
pub mod keyapi;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod oauth;
pub mod path;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod shadow;
pub mod state;
pub mod store;
pub mod tls;
pub mod watch;
