//! Keep-alive HTTP/1.1 connections to a plain-`http` backend, pooled by the proxy itself.
//!
//! hyper-util's legacy client pools by a hashed key behind a mutex, wraps every connection in
//! reference-counted bookkeeping, and races a new connection against a returning idle one
//! (hyper#4134). A sidecar talks to exactly one backend, so the pool is one list: take the
//! newest ready connection, or open one; give it back as soon as the response head is in (hyper
//! queues nothing on an HTTP/1 connection, so `is_ready` says when its body is done). A request
//! that a connection closed by the backend never sent is retried once on a fresh connection,
//! which is what the legacy client does too.

use std::cell::Cell;
use std::sync::Mutex;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::ClientBody;

/// Idle connections kept at most, per shard.
const MAX_IDLE: usize = 1024;
/// Proxy threads at most (`server::serve` runs one per core).
pub const MAX_SHARDS: usize = 64;

thread_local! {
    /// Which proxy thread this is (0: not one of them).
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Marks this thread as proxy thread `shard` (1-based): its requests use its own connections,
/// whose tasks run on its own runtime, so no request wakes another thread.
pub fn enter_shard(shard: usize) {
    SHARD.with(|s| s.set(shard.min(MAX_SHARDS)));
}

/// Why a request did not get a response from the backend.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be opened.
    #[error("connecting to {authority}: {reason}")]
    Connect {
        /// host:port.
        authority: String,
        /// What went wrong.
        reason: String,
    },
    /// The connection failed while the request was on it.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// The pool for one backend.
pub struct Pool {
    authority: http::uri::Authority,
    connect_timeout: Duration,
    /// Per shard; index 0 for threads that are not proxy threads.
    idle: Box<[Mutex<Vec<SendRequest<ClientBody>>>]>,
}

impl Pool {
    /// A pool for `authority` (host:port of an `http` backend).
    pub fn new(authority: http::uri::Authority, connect_timeout: Duration) -> Pool {
        Pool {
            authority,
            connect_timeout,
            idle: (0..=MAX_SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// Sends the request on a pooled connection, or a new one.
    pub async fn send(
        &self,
        request: Request<ClientBody>,
    ) -> Result<Response<Incoming>, PoolError> {
        let mut request = request;
        if let Some(mut sender) = self.take() {
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.give_back(sender);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: the backend had closed this connection. Try a fresh one.
                    Some(unsent) => request = unsent,
                    None => return Err(PoolError::Http(e.into_error())),
                },
            }
        }
        let mut sender = self.connect().await?;
        let response = sender.send_request(request).await?;
        self.give_back(sender);
        Ok(response)
    }

    /// The newest idle connection that can take a request now; closed ones are dropped, and
    /// ones still streaming a response body stay for later.
    fn take(&self) -> Option<SendRequest<ClientBody>> {
        let mut idle = self.shard().lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|s| !s.is_closed());
        let ready = idle.iter().rposition(|s| s.is_ready())?;
        Some(idle.swap_remove(ready))
    }

    fn shard(&self) -> &Mutex<Vec<SendRequest<ClientBody>>> {
        &self.idle[SHARD.with(Cell::get)]
    }

    fn give_back(&self, sender: SendRequest<ClientBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.shard().lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<SendRequest<ClientBody>, PoolError> {
        let failed = |reason: String| PoolError::Connect {
            authority: self.authority.to_string(),
            reason,
        };
        let port = self.authority.port_u16().unwrap_or(80);
        let host = self
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| failed(format!("no connection within {:?}", self.connect_timeout)))?
            .map_err(|e| failed(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "backend connection ended");
            }
        });
        Ok(sender)
    }
}
