//! The shared key store on PostgreSQL: many proxies (and CLIs) on one database, as Kong's DB
//! mode runs many gateway nodes on one Postgres.
//!
//! - Tables live in the schema `portcullis`, created and migrated on first use under an
//!   advisory lock, so proxies starting together migrate once.
//! - Every key change runs in one transaction that first takes a transaction-level advisory
//!   lock and then stamps the row with `nextval('portcullis.change_seq')`. Writers are therefore
//!   serialised, so change numbers are committed in order and a reader that has seen change N
//!   has seen every change before it. Revoked keys stay as tombstones so deletions travel too.
//! - Readers follow with `SELECT … WHERE change_seq > $cursor` (the delta poll) and are woken
//!   early by `NOTIFY portcullis_keys`, which is lost while a listener is disconnected: the poll
//!   is what guarantees nothing is missed, the notification only makes it fast.
//! - Usage (`calls`, `last_used`) is added by each proxy with one batched statement per flush.
//!
//! The password comes from the URL or `PGPASSWORD` and never appears in a message: every error
//! names the store by its redacted URL.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{pin_mut, StreamExt, TryStreamExt};
use tokio::sync::{mpsc, Mutex};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, NoTls, Row, Socket};

use super::{Applied, Edit, Listed, StoreError};
use crate::keys::entry::{Change, KeyEntry};

/// The NOTIFY channel every change is announced on.
pub const CHANNEL: &str = "portcullis_keys";
/// Serialises migrations across proxies starting at once.
const MIGRATION_LOCK: i64 = 0x706f_7274_0001;
/// Serialises key changes, so change numbers commit in order.
const CHANGE_LOCK: i64 = 0x706f_7274_0002;
/// Longest a single database operation may take before the store counts as unavailable.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys imported per transaction by `keys import`.
const IMPORT_CHUNK: usize = 5_000;
/// Changes fetched per delta poll; a larger backlog is fetched in several polls.
pub const DELTA_BATCH: i64 = 10_000;

const MIGRATIONS: &[&str] = &[
    // 1: keys with a change sequence and tombstones; usage totals.
    "CREATE SEQUENCE portcullis.change_seq;
     CREATE TABLE portcullis.keys (
         id text PRIMARY KEY,
         prefix text NOT NULL,
         hash text NOT NULL,
         principal text NOT NULL,
         scopes text[],
         purpose text,
         active boolean NOT NULL,
         created text,
         expires text,
         revoked boolean NOT NULL DEFAULT false,
         change_seq bigint NOT NULL
     );
     CREATE INDEX keys_change_seq_idx ON portcullis.keys (change_seq);
     CREATE INDEX keys_principal_idx ON portcullis.keys (principal) WHERE NOT revoked;
     CREATE TABLE portcullis.usage (
         key_id text PRIMARY KEY,
         calls bigint NOT NULL DEFAULT 0,
         last_used bigint
     );",
    // 2: usage rows are updated in place every flush: room on each page keeps the updates HOT
    // (measured 11 % -> 91 % HOT, and a sixth of the heap, in benches/store).
    "ALTER TABLE portcullis.usage SET (fillfactor = 70);",
];

const COLUMNS: &str = "id, prefix, hash, principal, scopes, purpose, active, created, expires";

/// How to verify the server (`sslmode` in the URL; libpq's default is `prefer`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum SslMode {
    Disable,
    /// Encrypt when the server offers it, without verifying (libpq's `prefer`).
    Prefer,
    /// Encrypt, without verifying the server (libpq's `require`).
    Require,
    /// Encrypt and verify the chain and the host name, against `sslrootcert` or system roots.
    VerifyFull(Option<std::path::PathBuf>),
}

/// A parsed `postgres://` URL: the client configuration and the TLS rules, with a redacted form
/// for messages.
#[derive(Clone)]
pub struct PgLocation {
    config: tokio_postgres::Config,
    ssl: SslMode,
    redacted: String,
}

impl PartialEq for PgLocation {
    fn eq(&self, other: &Self) -> bool {
        self.redacted == other.redacted && self.ssl == other.ssl
    }
}

impl Eq for PgLocation {}

impl std::fmt::Debug for PgLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl PgLocation {
    /// Whether `text` is a PostgreSQL URL rather than a path.
    pub fn is_url(text: &str) -> bool {
        text.starts_with("postgres://") || text.starts_with("postgresql://")
    }

    /// Parses libpq's URI form. `sslmode` (`disable`, `prefer`, `require`, `verify-full`) and
    /// `sslrootcert` are read here; the rest goes to `tokio_postgres`. The password may come
    /// from `PGPASSWORD`. Errors never contain the password.
    pub fn parse(url: &str) -> Result<PgLocation, String> {
        let redacted = redact(url);
        let fail = |what: &str| format!("keys: {redacted}: {what}");
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        let mut mode = None;
        let mut root = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "sslmode" => mode = Some(value.to_string()),
                "sslrootcert" => root = Some(std::path::PathBuf::from(percent_decode(value))),
                "sslcert" | "sslkey" | "sslpassword" => {
                    return Err(fail(&format!(
                        "{name} (client certificates) is not supported"
                    )))
                }
                _ => kept.push(pair),
            }
        }
        let ssl = match mode.as_deref() {
            None | Some("prefer") | Some("allow") => SslMode::Prefer,
            Some("disable") => SslMode::Disable,
            Some("require") => SslMode::Require,
            Some("verify-full") => SslMode::VerifyFull(root.clone()),
            Some("verify-ca") => {
                return Err(fail("sslmode=verify-ca is not supported; use verify-full"))
            }
            Some(other) => return Err(fail(&format!("unknown sslmode {other:?}"))),
        };
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| {
            // tokio-postgres errors name the option, never its value.
            fail(&format!("not a valid PostgreSQL URL ({e})"))
        })?;
        if config.get_hosts().is_empty() {
            return Err(fail("the URL names no host"));
        }
        if config.get_password().is_none() {
            if let Ok(password) = std::env::var("PGPASSWORD") {
                config.password(password);
            }
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(3));
        }
        config.application_name("portcullis");
        config.ssl_mode(match ssl {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyFull(_) => tokio_postgres::config::SslMode::Require,
        });
        Ok(PgLocation {
            config,
            ssl,
            redacted,
        })
    }

    /// The URL without its password.
    pub fn redacted(&self) -> String {
        self.redacted.clone()
    }

    fn tls(&self) -> Result<Tls, StoreError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Failed(e.to_string()))?;
        let config = match &self.ssl {
            SslMode::Disable => return Ok(Tls::Plain),
            SslMode::Prefer | SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                .with_no_client_auth(),
            SslMode::VerifyFull(root) => {
                let roots = match root {
                    Some(path) => crate::tls::root_store(path).map_err(StoreError::Failed)?,
                    None => crate::tls::native_roots(),
                };
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        Ok(Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
            config,
        )))
    }
}

/// `user:password@` → `user:***@`, and a `password=` parameter's value hidden.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "postgres://***".into();
    };
    let (authority_end, _) = rest
        .char_indices()
        .find(|(_, c)| *c == '/' || *c == '?')
        .unwrap_or((rest.len(), ' '));
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => format!("{user}@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some(("password", _)) => "password=***".to_string(),
                    _ => p.to_string(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(v) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `sslmode=require`/`prefer`: encrypt, check the handshake signature, trust any certificate
/// (libpq's meaning of these modes). `verify-full` is what checks who the server is.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

enum Tls {
    Plain,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

/// A database error in terms of what the caller can do: connection trouble means "unavailable,
/// try later"; anything the server answered with an SQL state is a failure.
fn db_error(store: &str, e: &tokio_postgres::Error) -> StoreError {
    match e.code() {
        None => StoreError::Unavailable(format!("{store}: {}", plain(e))),
        Some(_) => StoreError::Failed(format!("{store}: {}", plain(e))),
    }
}

/// The error and its sources; tokio-postgres never includes the password in them.
fn plain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Usage to add to the store: one key's calls since the last flush and its latest use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    /// Key id.
    pub id: String,
    /// Calls to add.
    pub calls: u64,
    /// Latest use (Unix seconds), if any.
    pub last_used: Option<i64>,
}

/// Changes after a cursor, and the cursor they bring the reader to.
#[derive(Debug, Clone, Default)]
pub struct Delta {
    /// In change order.
    pub changes: Vec<Change>,
    /// The change number of the last one (the old cursor when there are none).
    pub cursor: i64,
    /// Whether more changes wait beyond this batch.
    pub more: bool,
}

/// The store.
pub struct PgStore {
    location: PgLocation,
    client: Mutex<Option<Client>>,
}

impl PgStore {
    /// A store for `location`; nothing is connected until first use.
    pub fn new(location: PgLocation) -> PgStore {
        PgStore {
            location,
            client: Mutex::new(None),
        }
    }

    /// The redacted URL.
    pub fn describe(&self) -> String {
        self.location.redacted()
    }

    async fn connect(&self) -> Result<Client, StoreError> {
        let store = self.describe();
        let config = self.location.config.clone();
        let client = match self.location.tls()? {
            Tls::Plain => spawn_connection(&store, config.connect(NoTls).await)?,
            Tls::Rustls(tls) => spawn_connection(&store, config.connect(tls).await)?,
        };
        migrate(&store, &client).await?;
        Ok(client)
    }

    /// Runs `op` with the store's connection, connecting (and migrating) first when needed, all
    /// within [`OPERATION_TIMEOUT`].
    async fn with_client<T>(
        &self,
        op: impl for<'c> FnOnce(
            &'c mut Client,
        ) -> futures_util::future::BoxFuture<'c, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let store = self.describe();
        let work = async {
            let mut guard = self.client.lock().await;
            if guard.as_ref().is_none_or(Client::is_closed) {
                *guard = Some(self.connect().await?);
            }
            let Some(client) = guard.as_mut() else {
                return Err(StoreError::Unavailable(format!("{store}: not connected")));
            };
            let result = op(client).await;
            if matches!(result, Err(StoreError::Unavailable(_))) {
                *guard = None;
            }
            result
        };
        match tokio::time::timeout(OPERATION_TIMEOUT, work).await {
            Ok(result) => result,
            Err(_) => {
                *self.client.lock().await = None;
                Err(StoreError::Unavailable(format!(
                    "{store}: no answer within {OPERATION_TIMEOUT:?}"
                )))
            }
        }
    }

    /// Applies one edit in one transaction under the change lock, and announces it.
    pub async fn apply(&self, edit: Edit) -> Result<Applied, StoreError> {
        let store = self.describe();
        self.with_client(move |client| {
            Box::pin(async move {
                let e = |err: tokio_postgres::Error| db_error(&store, &err);
                let tx = client.transaction().await.map_err(e)?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOCK])
                    .await
                    .map_err(e)?;
                let applied = edit_in(&tx, edit, &store).await?;
                tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL])
                    .await
                    .map_err(e)?;
                tx.commit().await.map_err(e)?;
                Ok(applied)
            })
        })
        .await
    }

    /// One live key by id, with its usage totals.
    pub async fn entry(&self, id: &str) -> Result<Option<Listed>, StoreError> {
        let store = self.describe();
        let id = id.to_string();
        self.with_client(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &format!("SELECT {COLUMNS}, u.calls, u.last_used FROM portcullis.keys k LEFT JOIN portcullis.usage u ON u.key_id = k.id WHERE k.id = $1 AND NOT k.revoked"),
                        &[&id],
                    )
                    .await
                    .map_err(|err| db_error(&store, &err))?;
                rows.first().map(listed).transpose()
            })
        })
        .await
    }

    /// Every live key (or one principal's), oldest first, with usage totals.
    pub async fn entries(&self, principal: Option<&str>) -> Result<Vec<Listed>, StoreError> {
        let store = self.describe();
        let principal = principal.map(str::to_string);
        self.with_client(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &format!("SELECT {COLUMNS}, u.calls, u.last_used FROM portcullis.keys k LEFT JOIN portcullis.usage u ON u.key_id = k.id WHERE NOT k.revoked AND ($1::text IS NULL OR k.principal = $1) ORDER BY k.change_seq"),
                        &[&principal],
                    )
                    .await
                    .map_err(|err| db_error(&store, &err))?;
                rows.iter().map(listed).collect()
            })
        })
        .await
    }

    /// Streams every live key to `sink` from one consistent snapshot and returns the change
    /// number that snapshot includes (the cursor to poll from).
    pub async fn load(
        &self,
        sink: std::sync::mpsc::SyncSender<Vec<KeyEntry>>,
    ) -> Result<i64, StoreError> {
        let store = self.describe();
        let work = async {
            let mut client = self.connect().await?;
            let e = |err: tokio_postgres::Error| db_error(&store, &err);
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(e)?;
            let cursor: i64 = tx
                .query_one(
                    "SELECT coalesce(max(change_seq), 0)::int8 FROM portcullis.keys",
                    &[],
                )
                .await
                .map_err(e)?
                .get(0);
            let rows = tx
                .query_raw(
                    &format!("SELECT {COLUMNS} FROM portcullis.keys WHERE NOT revoked"),
                    std::iter::empty::<&str>(),
                )
                .await
                .map_err(e)?;
            pin_mut!(rows);
            let mut batch = Vec::with_capacity(4096);
            while let Some(row) = rows.try_next().await.map_err(e)? {
                batch.push(entry_of(&row)?);
                if batch.len() == 4096 {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(4096));
                    if sink.send(full).is_err() {
                        return Err(StoreError::Failed("the loader stopped".into()));
                    }
                }
            }
            let _ = sink.send(batch);
            tx.commit().await.map_err(e)?;
            Ok(cursor)
        };
        work.await
    }

    /// Changes after `cursor`, at most [`DELTA_BATCH`].
    pub async fn changes_since(&self, cursor: i64) -> Result<Delta, StoreError> {
        let store = self.describe();
        self.with_client(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &format!("SELECT {COLUMNS}, revoked, change_seq FROM portcullis.keys WHERE change_seq > $1 ORDER BY change_seq LIMIT $2"),
                        &[&cursor, &DELTA_BATCH],
                    )
                    .await
                    .map_err(|err| db_error(&store, &err))?;
                let mut delta = Delta {
                    cursor,
                    more: rows.len() as i64 == DELTA_BATCH,
                    changes: Vec::with_capacity(rows.len()),
                };
                for row in &rows {
                    let revoked: bool = row.get("revoked");
                    delta.cursor = row.get("change_seq");
                    delta.changes.push(if revoked {
                        Change::Remove(row.get("id"))
                    } else {
                        Change::Upsert(entry_of(row)?)
                    });
                }
                Ok(delta)
            })
        })
        .await
    }

    /// Adds usage with one statement, in key order so concurrent flushes never deadlock.
    pub async fn add_usage(&self, mut batch: Vec<UsageDelta>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        batch.sort_by(|a, b| a.id.cmp(&b.id));
        let store = self.describe();
        self.with_client(move |client| {
            Box::pin(async move {
                let ids: Vec<&str> = batch.iter().map(|u| u.id.as_str()).collect();
                let calls: Vec<i64> = batch
                    .iter()
                    .map(|u| i64::try_from(u.calls).unwrap_or(i64::MAX))
                    .collect();
                let last: Vec<Option<i64>> = batch.iter().map(|u| u.last_used).collect();
                client
                    .execute(
                        "INSERT INTO portcullis.usage (key_id, calls, last_used)
                         SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[])
                         ON CONFLICT (key_id) DO UPDATE SET
                           calls = portcullis.usage.calls + EXCLUDED.calls,
                           last_used = GREATEST(portcullis.usage.last_used, EXCLUDED.last_used)",
                        &[&ids, &calls, &last],
                    )
                    .await
                    .map_err(|err| db_error(&store, &err))?;
                Ok(())
            })
        })
        .await
    }

    /// Copies entries into the store; ids already there are skipped. Returns how many were added.
    pub async fn import(&self, entries: Vec<KeyEntry>) -> Result<usize, StoreError> {
        // In transactions of IMPORT_CHUNK keys, each well inside the operation timeout, so a
        // million keys import in one run; ids already there are skipped, so a run cut short is
        // finished by running it again.
        let mut added = 0;
        for chunk in entries.chunks(IMPORT_CHUNK) {
            let chunk = chunk.to_vec();
            let store = self.describe();
            added += self
                .with_client(move |client| {
                    Box::pin(async move {
                        let e = |err: tokio_postgres::Error| db_error(&store, &err);
                        let tx = client.transaction().await.map_err(e)?;
                        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOCK])
                            .await
                            .map_err(e)?;
                        let mut added = 0;
                        for entry in &chunk {
                            added += insert(&tx, entry, true).await.map_err(e)?;
                        }
                        tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL])
                            .await
                            .map_err(e)?;
                        tx.commit().await.map_err(e)?;
                        Ok(added as usize)
                    })
                })
                .await?;
        }
        // Fresh statistics, so every proxy's delta poll uses the change_seq index at once.
        let store = self.describe();
        self.with_client(move |client| {
            Box::pin(async move {
                client
                    .batch_execute("ANALYZE portcullis.keys")
                    .await
                    .map_err(|err| db_error(&store, &err))
            })
        })
        .await?;
        Ok(added)
    }

    /// Listens for change notifications and sends `()` on `trigger` for each (and after every
    /// reconnect, to catch up on what was missed), reconnecting with capped backoff forever.
    pub async fn listen(&self, trigger: mpsc::Sender<()>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let outcome = match self.location.tls() {
                Ok(Tls::Plain) => listen_once(&self.location.config, NoTls, &trigger).await,
                Ok(Tls::Rustls(tls)) => listen_once(&self.location.config, tls, &trigger).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::debug!(store = %self.describe(), error = %e, "key change listener disconnected")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// One LISTEN session: returns when the connection ends.
async fn listen_once<T>(
    config: &tokio_postgres::Config,
    tls: T,
    trigger: &mpsc::Sender<()>,
) -> Result<(), StoreError>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = config
        .connect(tls)
        .await
        .map_err(|e| StoreError::Unavailable(plain(&e)))?;
    let messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    pin_mut!(messages);
    let subscribe = async {
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(|e| StoreError::Unavailable(plain(&e)))?;
        let _ = trigger.try_send(());
        std::future::pending::<Result<(), StoreError>>().await
    };
    pin_mut!(subscribe);
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(_))) => { let _ = trigger.try_send(()); }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(StoreError::Unavailable(plain(&e))),
                None => return Ok(()),
            },
            result = &mut subscribe => return result,
        }
    }
}

fn spawn_connection<S, T>(
    store: &str,
    connected: Result<(Client, tokio_postgres::Connection<S, T>), tokio_postgres::Error>,
) -> Result<Client, StoreError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = connected.map_err(|e| db_error(store, &e))?;
    let store = store.to_string();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%store, error = %plain(&e), "key store connection ended");
        }
    });
    Ok(client)
}

/// Creates the schema and applies missing migrations, once, however many proxies start.
async fn migrate(store: &str, client: &Client) -> Result<(), StoreError> {
    let e = |err: tokio_postgres::Error| db_error(store, &err);
    client.batch_execute("BEGIN").await.map_err(e)?;
    let result = async {
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        client
            .batch_execute(
                "CREATE SCHEMA IF NOT EXISTS portcullis;
                 CREATE TABLE IF NOT EXISTS portcullis.schema_migrations (
                     version integer PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now()
                 );",
            )
            .await?;
        let done: i32 = client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM portcullis.schema_migrations",
                &[],
            )
            .await?
            .get(0);
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(done as usize) {
            client.batch_execute(sql).await?;
            client
                .execute(
                    "INSERT INTO portcullis.schema_migrations (version) VALUES ($1)",
                    &[&(i as i32 + 1)],
                )
                .await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    }
    .await;
    match result {
        Ok(()) => client.batch_execute("COMMIT").await.map_err(e),
        Err(err) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e(err))
        }
    }
}

/// One edit inside the change transaction.
async fn edit_in(
    tx: &tokio_postgres::Transaction<'_>,
    edit: Edit,
    store: &str,
) -> Result<Applied, StoreError> {
    let e = |err: tokio_postgres::Error| db_error(store, &err);
    let current = |id: String| async move {
        let rows = tx
            .query(
                &format!("SELECT {COLUMNS} FROM portcullis.keys WHERE id = $1 AND NOT revoked"),
                &[&id],
            )
            .await
            .map_err(e)?;
        match rows.first() {
            Some(row) => entry_of(row),
            None => Err(StoreError::NotFound(crate::keys::secret::shown_id(&id))),
        }
    };
    match edit {
        Edit::Create {
            entry,
            max_per_principal,
        } => {
            if let Some(max) = max_per_principal {
                let held: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM portcullis.keys WHERE principal = $1 AND NOT revoked",
                        &[&entry.principal],
                    )
                    .await
                    .map_err(e)?
                    .get(0);
                if held as usize >= max {
                    return Err(StoreError::Quota {
                        principal: entry.principal.clone(),
                        max,
                    });
                }
            }
            if insert(tx, &entry, true).await.map_err(e)? == 0 {
                return Err(StoreError::Failed("key id collision; try again".into()));
            }
            Ok(Applied {
                before: None,
                after: Some(entry),
            })
        }
        Edit::SetActive { id, active } => {
            let before = current(id.clone()).await?;
            tx.execute(
                "UPDATE portcullis.keys SET active = $2, change_seq = nextval('portcullis.change_seq') WHERE id = $1",
                &[&id, &active],
            )
            .await
            .map_err(e)?;
            let mut after = before.clone();
            after.active = active;
            Ok(Applied {
                before: Some(before),
                after: Some(after),
            })
        }
        Edit::Revoke { id } => {
            let before = current(id.clone()).await?;
            tx.execute(
                "UPDATE portcullis.keys SET revoked = true, change_seq = nextval('portcullis.change_seq') WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(e)?;
            Ok(Applied {
                before: Some(before),
                after: None,
            })
        }
        Edit::Rotate {
            id,
            new,
            created,
            old_expiry,
        } => {
            let before = current(id.clone()).await?;
            let mut old = before.clone();
            let successor = old.rotate_to(&new, created, old_expiry);
            tx.execute(
                "UPDATE portcullis.keys SET expires = $2, change_seq = nextval('portcullis.change_seq') WHERE id = $1",
                &[&id, &old.expires],
            )
            .await
            .map_err(e)?;
            if insert(tx, &successor, true).await.map_err(e)? == 0 {
                return Err(StoreError::Failed("key id collision; try again".into()));
            }
            Ok(Applied {
                before: Some(before),
                after: Some(successor),
            })
        }
    }
}

/// Inserts an entry with the next change number; with `skip_existing`, an id already present
/// (live or revoked) is left alone and 0 is returned.
async fn insert(
    tx: &tokio_postgres::Transaction<'_>,
    entry: &KeyEntry,
    skip_existing: bool,
) -> Result<u64, tokio_postgres::Error> {
    let conflict = if skip_existing {
        "ON CONFLICT (id) DO NOTHING"
    } else {
        ""
    };
    tx.execute(
        &format!(
            "INSERT INTO portcullis.keys ({COLUMNS}, change_seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, nextval('portcullis.change_seq')) {conflict}"
        ),
        &[
            &entry.id,
            &entry.prefix,
            &entry.hash,
            &entry.principal,
            &entry.scopes,
            &entry.purpose,
            &entry.active,
            &entry.created,
            &entry.expires,
        ],
    )
    .await
}

fn entry_of(row: &Row) -> Result<KeyEntry, StoreError> {
    let get = |e: tokio_postgres::Error| StoreError::Failed(format!("unexpected key row: {e}"));
    Ok(KeyEntry {
        id: row.try_get("id").map_err(get)?,
        prefix: row.try_get("prefix").map_err(get)?,
        hash: row.try_get("hash").map_err(get)?,
        principal: row.try_get("principal").map_err(get)?,
        scopes: row.try_get("scopes").map_err(get)?,
        purpose: row.try_get("purpose").map_err(get)?,
        active: row.try_get("active").map_err(get)?,
        created: row.try_get("created").map_err(get)?,
        expires: row.try_get("expires").map_err(get)?,
    })
}

fn listed(row: &Row) -> Result<Listed, StoreError> {
    let calls: Option<i64> = row.try_get("calls").unwrap_or(None);
    Ok(Listed {
        entry: entry_of(row)?,
        calls: Some(calls.map_or(0, |c| c.max(0) as u64)),
        last_used: row.try_get("last_used").unwrap_or(None),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_are_parsed_and_never_shown_with_their_password() {
        let pg = PgLocation::parse(
            "postgres://portcullis:s3cret@db.internal:5432/keys?sslmode=verify-full&sslrootcert=/etc/pg/ca.pem",
        )
        .unwrap();
        assert_eq!(
            pg.redacted(),
            "postgres://portcullis:***@db.internal:5432/keys?sslmode=verify-full&sslrootcert=/etc/pg/ca.pem"
        );
        assert_eq!(pg.ssl, SslMode::VerifyFull(Some("/etc/pg/ca.pem".into())));
        assert!(!format!("{pg:?}").contains("s3cret"));
        let err = PgLocation::parse("postgres://u:s3cret@h/db?sslmode=bogus").unwrap_err();
        assert!(err.contains("bogus") && !err.contains("s3cret"), "{err}");
        let err = PgLocation::parse("postgres://u:s3cret@h/db?nonsense=1").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        assert_eq!(
            redact("postgresql://u@h/db?password=hunter2&x=1"),
            "postgresql://u@h/db?password=***&x=1"
        );
        assert!(PgLocation::is_url("postgresql://h/db"));
        assert!(!PgLocation::is_url("keys.yaml"));
        assert_eq!(
            PgLocation::parse("postgres://h/db").unwrap().ssl,
            SslMode::Prefer
        );
        assert!(PgLocation::parse("postgres://h/db?sslmode=verify-ca").is_err());
    }
}
