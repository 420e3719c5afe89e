//! Benchmarks of the shared key store on PostgreSQL (issue 13), driven by `benches/store/run.sh`,
//! which starts a throwaway PostgreSQL and passes its URL. Every subcommand prints Markdown.
//!
//! - `store_bench propagation --bin BIN --url URL [--n 200] [--notify true] [--poll 1s] [--via api|cli]`:
//!   a trivial backend, two `portcullis run` processes (A and B) on the database; a key is made
//!   through A's key API (or with `portcullis keys create`), then B is asked with it until it
//!   answers 200. Repeated `n` times; prints the distribution.
//! - `store_bench startup --bin BIN --keys URL|FILE [--runs 3] [--idle 15] [--key-cache true]
//!   [--pg-pid PID]`: time from spawning `portcullis run` to `/readyz` answering 200, the peak
//!   RSS (`VmHWM`) then, and (with `--idle`) the idle proxy's CPU with every key loaded.
//! - `store_bench flush --url URL --monitor-url URL [--keys 10000] [--rounds 20]`: the usage flush
//!   statement of `src/store/postgres.rs` for N keys, timed from the client and by
//!   `pg_stat_statements`.
//! - `store_bench fetch --url URL [--runs 3]`: the database half of a full load alone (every key
//!   streamed and decoded as the proxy does, nothing kept).
//! - `store_bench sim --url URL --monitor-url URL --pg-pid PID [--clients 200] [--duration 60]
//!   [--notify true] [--poll 1s] [--flush 10s] [--flush-keys 100] [--change-every 5s]`: N
//!   simulated sidecars doing what `src/reload/feed.rs` does, with the SQL copied from
//!   `src/store/postgres.rs`; measures PostgreSQL's CPU, connections and statements per second
//!   (`--pooler-pid PID` adds a PgBouncer's CPU; `--statements prepared|typed` sends the poll
//!   and flush as statements prepared once per connection, or unnamed with `query_typed`).
//!
//! Everything it starts it stops (children by PID); loopback only; every run bounded in time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rand::seq::SliceRandom;
use rand::Rng;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls};

#[path = "../benches/workload/mod.rs"]
mod workload;

// ---- SQL copied from src/store/postgres.rs (keep in step with it) ----

const CHANNEL: &str = "portcullis_keys";
const MIGRATION_LOCK: i64 = 0x706f_7274_0001;
const CHANGE_LOCK: i64 = 0x706f_7274_0002;
const DELTA_BATCH: i64 = 10_000;
const COLUMNS: &str = "id, prefix, hash, principal, scopes, purpose, active, created, expires";
const USAGE_SQL: &str = "INSERT INTO portcullis.usage (key_id, calls, last_used)
                         SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[])
                         ON CONFLICT (key_id) DO UPDATE SET
                           calls = portcullis.usage.calls + EXCLUDED.calls,
                           last_used = GREATEST(portcullis.usage.last_used, EXCLUDED.last_used)";

fn delta_sql() -> String {
    format!("SELECT {COLUMNS}, revoked, change_seq FROM portcullis.keys WHERE change_seq > $1 ORDER BY change_seq LIMIT $2")
}

/// What `migrate` in src/store/postgres.rs runs on every new connection (schema already there).
/// With `typed`, every statement unnamed (`query_typed`), as a PgBouncer-safe store would send.
async fn migrate(client: &Client, typed: bool) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    if typed {
        client
            .query_typed(
                "SELECT pg_advisory_xact_lock($1)",
                &[(&MIGRATION_LOCK, Type::INT8)],
            )
            .await?;
    } else {
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
    }
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS portcullis;
             CREATE TABLE IF NOT EXISTS portcullis.schema_migrations (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await?;
    let sql = "SELECT coalesce(max(version), 0) FROM portcullis.schema_migrations";
    let rows = if typed {
        client.query_typed(sql, &[]).await?
    } else {
        client.query(sql, &[]).await?
    };
    let _done: Option<i32> = rows.first().map(|r| r.get(0));
    client.batch_execute("COMMIT").await
}

/// `PgStore::load`: one repeatable-read snapshot, the cursor, then every live key streamed.
async fn full_load(
    client: &mut Client,
    typed: bool,
) -> Result<(i64, usize), tokio_postgres::Error> {
    use futures_util::TryStreamExt;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let max = "SELECT coalesce(max(change_seq), 0)::int8 FROM portcullis.keys";
    let all = format!("SELECT {COLUMNS} FROM portcullis.keys WHERE NOT revoked");
    let cursor: i64 = if typed {
        tx.query_typed(max, &[]).await?
    } else {
        tx.query(max, &[]).await?
    }
    .first()
    .map_or(0, |r| r.get(0));
    let rows = if typed {
        tx.query_typed_raw(&all, std::iter::empty::<(&str, Type)>())
            .await?
    } else {
        tx.query_raw(&all, std::iter::empty::<&str>()).await?
    };
    futures_util::pin_mut!(rows);
    let mut n = 0;
    while let Some(row) = rows.try_next().await? {
        let _id: &str = row.get("id");
        n += 1;
    }
    tx.commit().await?;
    Ok((cursor, n))
}

// ---- arguments ----

struct Args(HashMap<String, String>);

impl Args {
    fn parse(rest: &[String]) -> anyhow::Result<Args> {
        let mut map = HashMap::new();
        let mut it = rest.iter();
        while let Some(name) = it.next() {
            let Some(name) = name.strip_prefix("--") else {
                bail!("expected --name value, got {name:?}");
            };
            let value = it
                .next()
                .with_context(|| format!("--{name} needs a value"))?;
            map.insert(name.to_string(), value.clone());
        }
        Ok(Args(map))
    }

    fn str(&self, name: &str) -> anyhow::Result<String> {
        self.0
            .get(name)
            .cloned()
            .with_context(|| format!("--{name} is required"))
    }

    fn or(&self, name: &str, default: &str) -> String {
        self.0
            .get(name)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }

    fn num(&self, name: &str, default: u64) -> anyhow::Result<u64> {
        match self.0.get(name) {
            Some(v) => v
                .parse()
                .with_context(|| format!("--{name} must be a number")),
            None => Ok(default),
        }
    }

    fn duration(&self, name: &str, default: &str) -> anyhow::Result<Duration> {
        let text = self.or(name, default);
        humantime::parse_duration(&text).with_context(|| format!("--{name}: {text:?}"))
    }

    fn flag(&self, name: &str, default: bool) -> anyhow::Result<bool> {
        match self.0.get(name).map(String::as_str) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(other) => bail!("--{name} must be true or false, not {other:?}"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        bail!("usage: store_bench propagation|startup|flush|sim --name value ...");
    };
    let options = Args::parse(rest)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match command.as_str() {
            "propagation" => propagation(&options).await,
            "startup" => startup(&options).await,
            "flush" => flush(&options).await,
            "sim" => sim(&options).await,
            "fetch" => fetch(&options).await,
            other => bail!("unknown subcommand {other:?}"),
        }
    })
}

// ---- small helpers ----

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Fields of /proc/PID/stat after the command name: (ppid, utime+stime, cutime+cstime).
fn proc_stat(pid: u32) -> Option<(u32, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((n(1)? as u32, n(11)? + n(12)?, n(13)? + n(14)?))
}

/// CPU ticks of a PostgreSQL cluster: every live process of the postmaster's (the postmaster's
/// own and its children's), plus what its exited children used (the postmaster reaps them, so
/// their time lands in its cutime/cstime). Also the number of children.
fn pg_cpu_ticks(postmaster: u32) -> (u64, usize) {
    let mut total = 0;
    let mut children = 0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Some((ppid, own, reaped)) = proc_stat(pid) else {
                continue;
            };
            if pid == postmaster {
                total += own + reaped;
            } else if ppid == postmaster {
                total += own;
                children += 1;
            }
        }
    }
    (total, children)
}

/// Private (anonymous) resident memory of the postmaster's children, in KiB, and how many.
fn pg_children_rss_anon(postmaster: u32) -> (u64, usize) {
    let mut total = 0;
    let mut n = 0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if proc_stat(pid).map(|s| s.0) != Some(postmaster) {
                continue;
            }
            if let Some(kib) = status_kib(pid, "RssAnon:") {
                total += kib;
                n += 1;
            }
        }
    }
    (total, n)
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

async fn pg_connect(url: &str, app: &str) -> anyhow::Result<Client> {
    let mut config: tokio_postgres::Config = url.parse().context("PostgreSQL URL")?;
    config.application_name(app);
    let (client, connection) = config.connect(NoTls).await.context("connecting")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

// ---- HTTP: a trivial backend and a keep-alive client ----

async fn start_backend() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"ok\n",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// One keep-alive HTTP/1.1 connection, reopened when the server closes it.
struct Http {
    addr: SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Http {
    fn new(addr: SocketAddr) -> Http {
        Http { addr, sender: None }
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        key: &str,
        body: &str,
    ) -> anyhow::Result<(u16, Bytes)> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().context("no connection")?;
        sender.ready().await?;
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let result = async {
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let bytes = response.into_body().collect().await?.to_bytes();
            Ok::<_, anyhow::Error>((status, bytes))
        }
        .await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn status(&mut self, path: &str, key: &str) -> u16 {
        match self.send("GET", path, key, "").await {
            Ok((status, _)) => status,
            Err(_) => 0,
        }
    }
}

// ---- portcullis processes ----

struct Proxy {
    child: tokio::process::Child,
    pid: u32,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl Proxy {
    /// Starts `BIN run -c CONFIG` and waits for both `listening` lines (printed after the keys
    /// are loaded and every listener is bound).
    async fn spawn(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<Proxy> {
        let mut child = tokio::process::Command::new(bin)
            .arg("run")
            .arg("-c")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let pid = child.id().context("child pid")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let (mut proxy, mut admin) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(120);
        while proxy.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match tokio::time::timeout(left, lines.next_line()).await {
                Ok(Ok(Some(line))) => line,
                other => bail!(
                    "portcullis did not start ({other:?}); see {}",
                    log.display()
                ),
            };
            if let Some(rest) = line.strip_prefix("listening proxy http://") {
                proxy = Some(rest.trim().parse()?);
            } else if let Some(rest) = line.strip_prefix("listening admin http://") {
                admin = Some(rest.trim().parse()?);
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Proxy {
            child,
            pid,
            proxy: proxy.context("proxy address")?,
            admin: admin.context("admin address")?,
        })
    }

    /// SIGTERM by PID, then SIGKILL after 10 s.
    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

fn cli_create(bin: &Path, url: &str, principal: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new(bin)
        .args(["keys", "create", "--keys", url, "--principal", principal])
        .output()?;
    if !out.status.success() {
        bail!(
            "keys create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

const PROPAGATION_POLICY: &str = r#"version: 1
routes:
  - match: GET /v1/datasets
    resource: datasets
    access: read
roles:
  admin: ["*:*", "api_keys:manage"]
principals:
  ada: { kind: user, roles: [admin] }
  bot: { kind: robot, grants: ["datasets:read"] }
"#;

// ---- 1. propagation across two proxies ----

async fn propagation(options: &Args) -> anyhow::Result<()> {
    let bin = PathBuf::from(options.str("bin")?);
    let url = options.str("url")?;
    let n = options.num("n", 200)? as usize;
    let notify = options.flag("notify", true)?;
    let poll = options.duration("poll", "1s")?;
    let via = options.or("via", "api");
    let work = tempfile::Builder::new().prefix("prop-").tempdir()?;
    let backend = start_backend().await?;
    std::fs::write(work.path().join("policy.yaml"), PROPAGATION_POLICY)?;
    let config = work.path().join("portcullis.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstream: http://{backend}\npolicy: {}\nkeys: {url}\n\
             key_store:\n  notify: {notify}\n  poll_interval: {}\n\
             key_api:\n  max_keys_per_principal: 1000000\n",
            work.path().join("policy.yaml").display(),
            humantime::format_duration(poll),
        ),
    )?;
    let admin_key = cli_create(&bin, &url, "ada")?;
    let a = Proxy::spawn(&bin, &config, &work.path().join("a.log")).await?;
    let b = Proxy::spawn(&bin, &config, &work.path().join("b.log")).await?;
    let result = propagation_rounds(&bin, &url, &a, &b, &admin_key, n, notify, poll, &via).await;
    a.stop().await;
    b.stop().await;
    let (written, seen) = result?;
    let written = sorted(written);
    let seen = sorted(seen);
    let mode = if notify {
        format!("notify on, poll {}", humantime::format_duration(poll))
    } else {
        format!("notify off, poll {}", humantime::format_duration(poll))
    };
    println!(
        "| {mode} | {via} | {n} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} / {:.1} |",
        percentile(&seen, 50.0),
        percentile(&seen, 90.0),
        percentile(&seen, 99.0),
        seen.last().copied().unwrap_or(f64::NAN),
        percentile(&written, 50.0),
        percentile(&written, 99.0),
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn propagation_rounds(
    bin: &Path,
    url: &str,
    a: &Proxy,
    b: &Proxy,
    admin_key: &str,
    n: usize,
    notify: bool,
    poll: Duration,
    via: &str,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mut on_a = Http::new(a.proxy);
    let mut on_b = Http::new(b.proxy);
    for http in [&mut on_a, &mut on_b] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while http.status("/v1/datasets", admin_key).await != 200 {
            if Instant::now() > deadline {
                bail!("the admin key never worked on a proxy");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A random pause before each change, so changes do not fall in step with B's poll ticks.
    let spread = if notify {
        Duration::from_millis(50)
    } else {
        poll
    };
    let mut written = Vec::with_capacity(n);
    let mut seen = Vec::with_capacity(n);
    for i in 0..n {
        let pause = rand::thread_rng().gen_range(0..spread.as_micros().max(1) as u64);
        tokio::time::sleep(Duration::from_micros(pause)).await;
        let started = Instant::now();
        let key = if via == "cli" {
            let bin = bin.to_path_buf();
            let url = url.to_string();
            tokio::task::spawn_blocking(move || cli_create(&bin, &url, "bot")).await??
        } else {
            let body = format!(r#"{{"principal":"bot","purpose":"propagation {i}"}}"#);
            let (status, bytes) = on_a
                .send("POST", "/_portcullis/v1/keys", admin_key, &body)
                .await?;
            if status != 201 {
                bail!(
                    "create answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            let made: serde_json::Value = serde_json::from_slice(&bytes)?;
            made["key"]
                .as_str()
                .context("no key in the answer")?
                .to_string()
        };
        written.push(started.elapsed().as_secs_f64() * 1e3);
        let deadline = started + Duration::from_secs(10);
        loop {
            if on_b.status("/v1/datasets", &key).await == 200 {
                break;
            }
            if Instant::now() > deadline {
                bail!("change {i} did not reach B within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok((written, seen))
}

// ---- 2. start with every key ----

async fn startup(options: &Args) -> anyhow::Result<()> {
    let bin = PathBuf::from(options.str("bin")?);
    let keys = options.str("keys")?;
    let runs = options.num("runs", 3)?;
    let idle = options.duration("idle", "0s")?;
    let with_cache = options.flag("key-cache", false)?;
    let pg_pid: Option<u32> = options.0.get("pg-pid").map(|p| p.parse()).transpose()?;
    let label = options.or("label", &keys);
    let ticks = clock_ticks();
    for run in 1..=runs {
        let work = tempfile::Builder::new().prefix("startup-").tempdir()?;
        std::fs::write(work.path().join("policy.yaml"), workload::policy_yaml(100))?;
        let keys_line = if keys.starts_with("postgres") {
            keys.clone()
        } else {
            std::fs::canonicalize(&keys)?.display().to_string()
        };
        let cache = if with_cache {
            format!("key_cache: {}\n", work.path().join("cache").display())
        } else {
            String::new()
        };
        let config = work.path().join("portcullis.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstream: http://127.0.0.1:9\npolicy: {}\nkeys: {keys_line}\n{cache}",
                work.path().join("policy.yaml").display()
            ),
        )?;
        let pg_before = pg_pid.map(|p| pg_cpu_ticks(p).0);
        let started = Instant::now();
        let proxy = Proxy::spawn(&bin, &config, &work.path().join("run.log")).await?;
        let mut admin = Http::new(proxy.admin);
        let listening = started.elapsed();
        let ready = loop {
            if admin.status("/readyz", "-").await == 200 {
                break started.elapsed();
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("never ready");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let hwm = status_kib(proxy.pid, "VmHWM:").unwrap_or(0);
        let rss = status_kib(proxy.pid, "VmRSS:").unwrap_or(0);
        let own = proc_stat(proxy.pid).map_or(0, |s| s.1);
        let pg_load =
            pg_before.map(|before| pg_cpu_ticks(pg_pid.unwrap_or(0)).0.saturating_sub(before));
        let mut idle_cell = String::from("–");
        if !idle.is_zero() && run == 1 {
            let pg_idle_before = pg_pid.map(|p| pg_cpu_ticks(p).0);
            let before = proc_stat(proxy.pid).map_or(0, |s| s.1);
            tokio::time::sleep(idle).await;
            let after = proc_stat(proxy.pid).map_or(0, |s| s.1);
            let hwm_after = status_kib(proxy.pid, "VmHWM:").unwrap_or(0);
            let pg_idle = pg_idle_before
                .map(|b| {
                    format!(
                        ", PostgreSQL {:.1} %",
                        pg_cpu_ticks(pg_pid.unwrap_or(0)).0.saturating_sub(b) as f64
                            / ticks
                            / idle.as_secs_f64()
                            * 100.0
                    )
                })
                .unwrap_or_default();
            idle_cell = format!(
                "{:.1} % of a core over {}{pg_idle}; peak RSS then {} MiB",
                (after - before) as f64 / ticks / idle.as_secs_f64() * 100.0,
                humantime::format_duration(idle),
                hwm_after / 1024
            );
        }
        proxy.stop().await;
        println!(
            "| {label} | {run} | {:.2} s | {:.2} s | {} MiB | {} MiB | {:.2} s | {} | {idle_cell} |",
            listening.as_secs_f64(),
            ready.as_secs_f64(),
            hwm / 1024,
            rss / 1024,
            own as f64 / ticks,
            pg_load.map_or("–".into(), |t| format!("{:.2} s", t as f64 / ticks)),
        );
    }
    Ok(())
}

/// The database side of a full load alone: connect, migrate, then every live key streamed and
/// decoded as `entry_of` does (nine columns into owned values), nothing kept.
async fn fetch(options: &Args) -> anyhow::Result<()> {
    use futures_util::TryStreamExt;
    let url = options.str("url")?;
    let runs = options.num("runs", 3)?;
    for run in 1..=runs {
        let started = Instant::now();
        let mut client = pg_connect(&url, "portcullis").await?;
        migrate(&client, false).await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let rows = tx
            .query_raw(
                &format!("SELECT {COLUMNS} FROM portcullis.keys WHERE NOT revoked"),
                std::iter::empty::<&str>(),
            )
            .await?;
        futures_util::pin_mut!(rows);
        let mut n = 0_usize;
        let mut bytes = 0_usize;
        while let Some(row) = rows.try_next().await? {
            let id: String = row.try_get("id")?;
            let prefix: String = row.try_get("prefix")?;
            let hash: String = row.try_get("hash")?;
            let principal: String = row.try_get("principal")?;
            let scopes: Option<Vec<String>> = row.try_get("scopes")?;
            let purpose: Option<String> = row.try_get("purpose")?;
            let _active: bool = row.try_get("active")?;
            let created: Option<String> = row.try_get("created")?;
            let expires: Option<String> = row.try_get("expires")?;
            bytes += id.len()
                + prefix.len()
                + hash.len()
                + principal.len()
                + scopes.map_or(0, |s| s.len())
                + purpose.map_or(0, |s| s.len())
                + created.map_or(0, |s| s.len())
                + expires.map_or(0, |s| s.len());
            n += 1;
        }
        tx.commit().await?;
        println!(
            "| fetch only (connect, migrate, stream and decode) | {run} | {n} rows | {:.2} s | {} MiB peak RSS | {} MB of text |",
            started.elapsed().as_secs_f64(),
            status_kib(std::process::id(), "VmHWM:").unwrap_or(0) / 1024,
            bytes / 1_000_000
        );
    }
    Ok(())
}

// ---- 3. one usage flush ----

fn usage_batch(ids: &[String]) -> (Vec<&str>, Vec<i64>, Vec<Option<i64>>) {
    let mut refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    refs.sort_unstable();
    let calls = vec![3_i64; refs.len()];
    let last = vec![Some(unix_now()); refs.len()];
    (refs, calls, last)
}

/// Server-side execution of the flush statement since the last reset: calls, mean and max ms.
async fn flush_stats(monitor: &Client, table: &str) -> Option<(i64, f64, f64)> {
    let row = monitor
        .query_opt(
            "SELECT sum(calls)::int8, sum(total_exec_time) / greatest(sum(calls), 1), max(max_exec_time)
             FROM pg_stat_statements WHERE query LIKE $1",
            &[&format!("INSERT INTO {table} %")],
        )
        .await
        .ok()??;
    Some((
        row.get::<_, Option<i64>>(0)?,
        row.get::<_, Option<f64>>(1)?,
        row.get::<_, Option<f64>>(2)?,
    ))
}

/// The flush phases against `table` (the real `portcullis.usage`, or a copy with another
/// fillfactor): one N-key flush into absent rows, `rounds` N-key flushes onto them, then
/// sidecar-sized 100-key flushes. One Markdown row per phase.
async fn flush_phases(
    client: &Client,
    monitor: &Client,
    table: &str,
    label: &str,
    ids: &[String],
    rounds: usize,
) -> anyhow::Result<()> {
    let sql = USAGE_SQL.replace("portcullis.usage", table);
    let reset = || async {
        monitor
            .execute("SELECT pg_stat_statements_reset()", &[])
            .await
    };
    let (refs, calls, last) = usage_batch(ids);
    let n = refs.len();
    client
        .execute(
            &format!("DELETE FROM {table} WHERE key_id = ANY($1)"),
            &[&refs],
        )
        .await?;
    let row = |what: String, client_ms: String, server: Option<(i64, f64, f64)>| {
        let server = server.map_or("–".into(), |(c, mean, max)| {
            format!("{mean:.2} / {max:.2} ({c} calls)")
        });
        println!("| {label} | {what} | {client_ms} | {server} |");
    };
    // As the code sends it: `execute` with the text, so prepared on every call.
    reset().await?;
    let started = Instant::now();
    client.execute(&sql, &[&refs, &calls, &last]).await?;
    let first = started.elapsed().as_secs_f64() * 1e3;
    row(
        format!("{n} keys, rows absent (insert)"),
        format!("{first:.1}"),
        flush_stats(monitor, table).await,
    );
    reset().await?;
    let mut updates = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        client.execute(&sql, &[&refs, &calls, &last]).await?;
        updates.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let updates = sorted(updates);
    row(
        format!("{n} keys, rows there (update), {rounds} flushes"),
        format!(
            "{:.1} (min {:.1}, max {:.1})",
            percentile(&updates, 50.0),
            updates.first().copied().unwrap_or(f64::NAN),
            updates.last().copied().unwrap_or(f64::NAN)
        ),
        flush_stats(monitor, table).await,
    );
    reset().await?;
    let mut small = Vec::new();
    for _ in 0..200 {
        let mut pick: Vec<String> = ids
            .choose_multiple(&mut rand::thread_rng(), 100)
            .cloned()
            .collect();
        pick.sort();
        let (refs, calls, last) = usage_batch(&pick);
        let started = Instant::now();
        client.execute(&sql, &[&refs, &calls, &last]).await?;
        small.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let small = sorted(small);
    row(
        "100 keys (a sidecar's), 200 flushes".into(),
        format!(
            "{:.2} (p99 {:.2})",
            percentile(&small, 50.0),
            percentile(&small, 99.0)
        ),
        flush_stats(monitor, table).await,
    );
    Ok(())
}

async fn flush(options: &Args) -> anyhow::Result<()> {
    let url = options.str("url")?;
    let monitor = pg_connect(&options.str("monitor-url")?, "store-bench-monitor").await?;
    let n = options.num("keys", 10_000)? as usize;
    let rounds = options.num("rounds", 20)? as usize;
    let fillfactor = options.num("fillfactor", 0)?;
    let client = pg_connect(&url, "portcullis").await?;
    let ids: Vec<String> = client
        .query(
            "SELECT id FROM portcullis.keys WHERE NOT revoked ORDER BY id LIMIT $1",
            &[&(n as i64)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if ids.len() < n {
        bail!("only {} keys in the store; import more first", ids.len());
    }
    println!("| table | flush | client round trip, ms (p50) | server execution, ms: mean / max |");
    println!("|---|---|---:|---:|");
    let mut tables = vec![(
        "portcullis.usage".to_string(),
        "`portcullis.usage`".to_string(),
    )];
    if fillfactor > 0 {
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS public.usage_ff;
                 CREATE TABLE public.usage_ff (LIKE portcullis.usage INCLUDING ALL) WITH (fillfactor = {fillfactor});"
            ))
            .await?;
        tables.push((
            "public.usage_ff".into(),
            format!("copy with fillfactor {fillfactor}"),
        ));
    }
    for (table, label) in &tables {
        flush_phases(&client, &monitor, table, label, &ids, rounds).await?;
    }
    // Table statistics reach the views within a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    println!();
    println!("| table | rows | updates | of them HOT | dead rows | heap | indexes |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (table, label) in &tables {
        let name = table.rsplit('.').next().unwrap_or(table);
        let schema = table.split('.').next().unwrap_or("public");
        let r = monitor
            .query_one(
                "SELECT n_live_tup, n_tup_upd, n_tup_hot_upd, n_dead_tup,
                        pg_size_pretty(pg_relation_size(relid)), pg_size_pretty(pg_indexes_size(relid))
                 FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = $2",
                &[&schema, &name],
            )
            .await?;
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} |",
            r.get::<_, i64>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3),
            r.get::<_, String>(4),
            r.get::<_, String>(5)
        );
    }
    // Where the time of one N-key update goes: EXPLAIN ANALYZE in a rolled-back transaction.
    let (refs, calls, last) = usage_batch(&ids);
    client.batch_execute("BEGIN").await?;
    let plan = client
        .query(
            &format!("EXPLAIN (ANALYZE, BUFFERS) {USAGE_SQL}"),
            &[&refs, &calls, &last],
        )
        .await?;
    client.batch_execute("ROLLBACK").await?;
    println!();
    println!("EXPLAIN (ANALYZE, BUFFERS) of one {n}-key flush onto existing rows (rolled back):");
    println!();
    println!("```");
    for r in plan {
        println!("{}", r.get::<_, String>(0));
    }
    println!("```");
    Ok(())
}

// ---- 4. N simulated sidecars ----

/// Aborts a spawned task when the sidecar that owns it is aborted.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Default)]
struct SimCounters {
    polls: AtomicU64,
    poll_rows: AtomicU64,
    flushes: AtomicU64,
    errors: AtomicU64,
    writer_errors: AtomicU64,
    notifications: AtomicU64,
}

struct SimShared {
    counters: SimCounters,
    /// Poll and flush round trips (µs) while measuring.
    poll_us: Mutex<Vec<u32>>,
    flush_us: Mutex<Vec<u32>>,
    /// Change number → when the writer's commit returned.
    changes: Mutex<HashMap<i64, Instant>>,
    /// Commit → this client's poll that returned it (ms).
    propagation_ms: Mutex<Vec<f64>>,
    measuring: std::sync::atomic::AtomicBool,
    ids: Vec<String>,
}

struct SimOptions {
    url: String,
    notify: bool,
    poll: Duration,
    flush: Duration,
    flush_keys: usize,
    load: bool,
    /// How statements are sent: `text` as the code does today (`query(&str)`: a named statement
    /// prepared, run and closed on every call), `prepared` (once per connection), `typed`
    /// (`query_typed`: unnamed, one round trip, PgBouncer-safe).
    statements: String,
}

/// One simulated sidecar, as `portcullis run` on a PostgreSQL store: a connection for the full
/// load (then closed), a LISTEN connection (with notify), and one connection for the delta polls
/// and usage flushes, each new store connection running `migrate` first.
async fn sidecar(
    shared: Arc<SimShared>,
    options: Arc<SimOptions>,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
) {
    let setup = async {
        let mut loader = pg_connect(&options.url, "portcullis").await?;
        let typed = options.statements == "typed";
        migrate(&loader, typed).await?;
        let cursor = if options.load {
            full_load(&mut loader, typed).await?.0
        } else {
            loader
                .query_one(
                    "SELECT coalesce(max(change_seq), 0)::int8 FROM portcullis.keys",
                    &[],
                )
                .await?
                .get(0)
        };
        drop(loader);
        let (wake_tx, wake_rx) = tokio::sync::mpsc::channel::<()>(1);
        let listener = if options.notify {
            let mut config: tokio_postgres::Config = options.url.parse()?;
            config.application_name("portcullis");
            let (client, mut connection) = config.connect(NoTls).await?;
            let shared = shared.clone();
            let task = tokio::spawn(async move {
                use futures_util::StreamExt;
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                            shared
                                .counters
                                .notifications
                                .fetch_add(1, Ordering::Relaxed);
                            let _ = wake_tx.try_send(());
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
            Some((client, task))
        } else {
            drop(wake_tx);
            None
        };
        let client = pg_connect(&options.url, "portcullis").await?;
        migrate(&client, typed).await?;
        Ok::<_, anyhow::Error>((cursor, client, wake_rx, listener))
    };
    let (cursor, client, mut wake_rx, listener) = match setup.await {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}"))).await;
            return;
        }
    };
    let _ = ready.send(Ok(())).await;
    let _listener = listener.map(|(client, task)| (client, AbortOnDrop(task)));
    let client = Arc::new(tokio::sync::Mutex::new(client));
    // Sidecars start at different times: spread the phases of the poll and flush ticks.
    let (poll_phase, flush_phase) = {
        let mut rng = rand::thread_rng();
        (
            Duration::from_micros(rng.gen_range(0..options.poll.as_micros().max(1) as u64)),
            Duration::from_micros(rng.gen_range(0..options.flush.as_micros().max(1) as u64)),
        )
    };
    let typed = options.statements == "typed";
    let statements = if options.statements == "prepared" {
        let c = client.lock().await;
        match (c.prepare(&delta_sql()).await, c.prepare(USAGE_SQL).await) {
            (Ok(poll), Ok(flush)) => Some((poll, flush)),
            _ => None,
        }
    } else {
        None
    };
    let flusher = {
        let (client, shared, options) = (client.clone(), shared.clone(), options.clone());
        let statement = statements.as_ref().map(|s| s.1.clone());
        AbortOnDrop(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + flush_phase, options.flush);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let mut pick: Vec<String> = shared
                    .ids
                    .choose_multiple(&mut rand::thread_rng(), options.flush_keys)
                    .cloned()
                    .collect();
                pick.sort();
                let (refs, calls, last) = usage_batch(&pick);
                let started = Instant::now();
                let guard = client.lock().await;
                let result = match &statement {
                    Some(st) => guard.execute(st, &[&refs, &calls, &last]).await,
                    None if typed => {
                        guard
                            .execute_typed(
                                USAGE_SQL,
                                &[
                                    (&refs, Type::TEXT_ARRAY),
                                    (&calls, Type::INT8_ARRAY),
                                    (&last, Type::INT8_ARRAY),
                                ],
                            )
                            .await
                    }
                    None => guard.execute(USAGE_SQL, &[&refs, &calls, &last]).await,
                };
                drop(guard);
                let took = started.elapsed();
                match result {
                    Ok(_) => {
                        shared.counters.flushes.fetch_add(1, Ordering::Relaxed);
                        if shared.measuring.load(Ordering::Relaxed) {
                            shared
                                .flush_us
                                .lock()
                                .unwrap()
                                .push(took.as_micros() as u32);
                        }
                    }
                    Err(_) => {
                        shared.counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }))
    };
    let sql = delta_sql();
    let mut cursor = cursor;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + poll_phase, options.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = wake_rx.recv() => {}
        }
        let started = Instant::now();
        // As `changes_since` sends it: `query` with the text, so prepared on every call.
        let guard = client.lock().await;
        let result = match &statements {
            Some((st, _)) => guard.query(st, &[&cursor, &DELTA_BATCH]).await,
            None if typed => {
                guard
                    .query_typed(&sql, &[(&cursor, Type::INT8), (&DELTA_BATCH, Type::INT8)])
                    .await
            }
            None => guard.query(&sql, &[&cursor, &DELTA_BATCH]).await,
        };
        drop(guard);
        let took = started.elapsed();
        match result {
            Ok(rows) => {
                shared.counters.polls.fetch_add(1, Ordering::Relaxed);
                shared
                    .counters
                    .poll_rows
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                if shared.measuring.load(Ordering::Relaxed) {
                    shared.poll_us.lock().unwrap().push(took.as_micros() as u32);
                }
                for row in &rows {
                    let seq: i64 = row.get("change_seq");
                    cursor = cursor.max(seq);
                    let committed = shared.changes.lock().unwrap().get(&seq).copied();
                    if let Some(at) = committed {
                        shared
                            .propagation_ms
                            .lock()
                            .unwrap()
                            .push(at.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
            Err(_) => {
                shared.counters.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if flusher.0.is_finished() {
            break;
        }
    }
}

/// A key change as `PgStore::apply` makes one: change lock, new change number, NOTIFY.
async fn change_writer(url: String, every: Duration, shared: Arc<SimShared>) -> anyhow::Result<()> {
    let mut client = pg_connect(&url, "portcullis").await?;
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let id = shared
            .ids
            .choose(&mut rand::thread_rng())
            .cloned()
            .unwrap_or_default();
        match one_change(&mut client, &id).await {
            Ok(seq) => {
                shared.changes.lock().unwrap().insert(seq, Instant::now());
            }
            Err(_) => {
                shared
                    .counters
                    .writer_errors
                    .fetch_add(1, Ordering::Relaxed);
                if client.is_closed() {
                    client = pg_connect(&url, "portcullis").await?;
                }
            }
        }
    }
}

async fn one_change(client: &mut Client, id: &str) -> Result<i64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOCK])
        .await?;
    let seq: i64 = tx
        .query_one(
            "UPDATE portcullis.keys SET active = active, change_seq = nextval('portcullis.change_seq') WHERE id = $1 RETURNING change_seq",
            &[&id],
        )
        .await?
        .get(0);
    tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
    tx.commit().await?;
    Ok(seq)
}

struct DbSnapshot {
    xact_commit: i64,
    tup_returned: i64,
    tup_fetched: i64,
    tup_updated: i64,
    tup_inserted: i64,
    statements: HashMap<String, i64>,
    connections: i64,
    wal_bytes: i64,
}

async fn db_snapshot(monitor: &Client) -> anyhow::Result<DbSnapshot> {
    let row = monitor
        .query_one(
            "SELECT xact_commit, tup_returned, tup_fetched, tup_updated, tup_inserted
             FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    let connections: i64 = monitor
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await?
        .get(0);
    let mut statements = HashMap::new();
    if let Ok(rows) = monitor
        .query(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 60), sum(calls)::int8 FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
             GROUP BY 1",
            &[],
        )
        .await
    {
        for r in rows {
            statements.insert(r.get(0), r.get(1));
        }
    }
    let wal_bytes: i64 = monitor
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[])
        .await?
        .get(0);
    Ok(DbSnapshot {
        xact_commit: row.get(0),
        tup_returned: row.get(1),
        tup_fetched: row.get(2),
        tup_updated: row.get(3),
        tup_inserted: row.get(4),
        statements,
        connections,
        wal_bytes,
    })
}

async fn sim(options: &Args) -> anyhow::Result<()> {
    let url = options.str("url")?;
    let monitor = pg_connect(&options.str("monitor-url")?, "store-bench-monitor").await?;
    let pg_pid: u32 = options.str("pg-pid")?.parse()?;
    let extra_pid: Option<u32> = options.0.get("pooler-pid").map(|p| p.parse()).transpose()?;
    let clients = options.num("clients", 200)? as usize;
    let duration = options.duration("duration", "60s")?;
    let warmup = options.duration("warmup", "5s")?;
    let change_every = options.duration("change-every", "5s")?;
    let sim_options = Arc::new(SimOptions {
        url: url.clone(),
        notify: options.flag("notify", true)?,
        poll: options.duration("poll", "1s")?,
        flush: options.duration("flush", "10s")?,
        flush_keys: options.num("flush-keys", 100)? as usize,
        load: options.flag("load", true)?,
        statements: options.or("statements", "text"),
    });
    let ticks = clock_ticks();
    let seed = pg_connect(&url, "store-bench").await?;
    let ids: Vec<String> = seed
        .query(
            "SELECT id FROM portcullis.keys WHERE NOT revoked LIMIT 100000",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let key_count = ids.len();
    if key_count < sim_options.flush_keys {
        bail!("only {key_count} keys in the store");
    }
    drop(seed);
    let shared = Arc::new(SimShared {
        counters: SimCounters::default(),
        poll_us: Mutex::new(Vec::new()),
        flush_us: Mutex::new(Vec::new()),
        changes: Mutex::new(HashMap::new()),
        propagation_ms: Mutex::new(Vec::new()),
        measuring: std::sync::atomic::AtomicBool::new(false),
        ids,
    });

    // Ramp: every sidecar starts at once (a fleet restart), as the real one would.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(clients.max(1));
    let ramp_cpu = pg_cpu_ticks(pg_pid).0;
    let ramp_started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        tasks.push(tokio::spawn(sidecar(
            shared.clone(),
            sim_options.clone(),
            ready_tx.clone(),
        )));
    }
    drop(ready_tx);
    let mut failed = Vec::new();
    for _ in 0..clients {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => failed.push(e),
            None => break,
        }
    }
    let ramp = ramp_started.elapsed();
    let ramp_cpu = pg_cpu_ticks(pg_pid).0.saturating_sub(ramp_cpu);
    if failed.len() == clients {
        bail!("no sidecar could start: {}", failed[0]);
    }
    if let Some(first) = failed.first() {
        eprintln!(
            "{} of {clients} sidecars could not start (measuring the rest), first: {first}",
            failed.len()
        );
    }
    let writer = (!change_every.is_zero())
        .then(|| tokio::spawn(change_writer(url.clone(), change_every, shared.clone())));
    tokio::time::sleep(warmup).await;

    // Measure.
    let (pg_before, backends) = pg_cpu_ticks(pg_pid);
    let extra_before = extra_pid.and_then(proc_stat).map_or(0, |s| s.1);
    let own_before = proc_stat(std::process::id()).map_or(0, |s| s.1);
    let db_before = db_snapshot(&monitor).await?;
    let polls_before = shared.counters.polls.load(Ordering::Relaxed);
    let flushes_before = shared.counters.flushes.load(Ordering::Relaxed);
    let notes_before = shared.counters.notifications.load(Ordering::Relaxed);
    shared.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    shared.measuring.store(false, Ordering::Relaxed);
    let wall = started.elapsed().as_secs_f64();
    let (pg_after, _) = pg_cpu_ticks(pg_pid);
    let extra_after = extra_pid.and_then(proc_stat).map_or(0, |s| s.1);
    let own_after = proc_stat(std::process::id()).map_or(0, |s| s.1);
    let db_after = db_snapshot(&monitor).await?;
    let (rss_anon, rss_n) = pg_children_rss_anon(pg_pid);
    let polls = shared.counters.polls.load(Ordering::Relaxed) - polls_before;
    let flushes = shared.counters.flushes.load(Ordering::Relaxed) - flushes_before;
    let notifications = shared.counters.notifications.load(Ordering::Relaxed) - notes_before;
    let errors = shared.counters.errors.load(Ordering::Relaxed);

    if let Some(w) = writer {
        w.abort();
    }
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }

    let pg_cores = pg_after.saturating_sub(pg_before) as f64 / ticks / wall;
    // A pooler in front (PgBouncer) counts with the database.
    let extra_cores = extra_after.saturating_sub(extra_before) as f64 / ticks / wall;
    let pg_cores = pg_cores + extra_cores;
    let failed_starts = failed.len();
    let sim_cores = (own_after - own_before) as f64 / ticks / wall;
    let commits = (db_after.xact_commit - db_before.xact_commit) as f64 / wall;
    let mut statement_rates: Vec<(String, f64)> = db_after
        .statements
        .iter()
        .map(|(q, calls)| {
            let before = db_before.statements.get(q).copied().unwrap_or(0);
            (q.clone(), (calls - before) as f64 / wall)
        })
        .filter(|(q, rate)| *rate > 0.0 && !q.contains("pg_stat") && !q.contains("pg_current_wal"))
        .collect();
    statement_rates.sort_by(|a, b| b.1.total_cmp(&a.1));
    let statements: f64 = statement_rates.iter().map(|(_, r)| r).sum();
    let poll_us = sorted(
        shared
            .poll_us
            .lock()
            .unwrap()
            .iter()
            .map(|&v| f64::from(v))
            .collect(),
    );
    let flush_us = sorted(
        shared
            .flush_us
            .lock()
            .unwrap()
            .iter()
            .map(|&v| f64::from(v))
            .collect(),
    );
    let propagation = sorted(shared.propagation_ms.lock().unwrap().clone());
    let feed = if sim_options.notify {
        "LISTEN + poll"
    } else {
        "poll only"
    };
    let mode = match sim_options.statements.as_str() {
        "text" => feed.to_string(),
        "prepared" => format!("{feed}, prepared once"),
        "typed" => format!("{feed}, unnamed (query_typed)"),
        other => format!("{feed}, {other}"),
    };
    println!(
        "| {clients} | {mode}, poll {} | {} | {:.3} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} / {:.0} | {:.2} / {:.2} | {:.1} / {:.1} | {} | {:.1} s, {:.1} CPU-s |",
        humantime::format_duration(sim_options.poll),
        db_after.connections,
        pg_cores,
        pg_cores / clients as f64 * 1e3,
        statements,
        commits,
        (db_after.tup_updated - db_before.tup_updated + db_after.tup_inserted - db_before.tup_inserted) as f64 / wall,
        polls as f64 / wall,
        flushes as f64 / wall,
        percentile(&poll_us, 50.0) / 1e3,
        percentile(&poll_us, 99.0) / 1e3,
        percentile(&propagation, 50.0),
        percentile(&propagation, 99.0),
        errors,
        ramp.as_secs_f64(),
        ramp_cpu as f64 / ticks,
    );
    eprintln!(
        "sim {clients} {mode}: {wall:.1} s measured; keys {key_count}; postgres children {backends}; PostgreSQL {pg_cores:.3} cores (of them the pooler {extra_cores:.3}); failed starts {failed_starts}; simulator {sim_cores:.3} cores; \
         polls {polls} ({:.0}/s), flushes {flushes} ({:.1}/s), notifications {notifications}, errors {errors}, writer errors {}; \
         commits {commits:.0}/s; tuples returned {:.0}/s fetched {:.0}/s; WAL {:.0} kB/s; \
         flush p50/p99 {:.2}/{:.2} ms; backends' private RSS {} KiB each (mean of {rss_n})",
        polls as f64 / wall,
        flushes as f64 / wall,
        shared.counters.writer_errors.load(Ordering::Relaxed),
        (db_after.tup_returned - db_before.tup_returned) as f64 / wall,
        (db_after.tup_fetched - db_before.tup_fetched) as f64 / wall,
        (db_after.wal_bytes - db_before.wal_bytes) as f64 / wall / 1024.0,
        percentile(&flush_us, 50.0) / 1e3,
        percentile(&flush_us, 99.0) / 1e3,
        rss_anon / (rss_n.max(1) as u64),
    );
    for (q, rate) in statement_rates.iter().take(8) {
        eprintln!("  {rate:>9.1}/s  {q}");
    }
    Ok(())
}
