//! The process configuration (`portcullis.yaml`): where to listen, where the backend is, which
//! files to load. Relative paths resolve against the config file's own folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::audit::AuditConfig;
use crate::diagnostic::{self, FileProblems, Problem};
use crate::path::MatrixParameters;
pub use crate::proxy::BackendConfig;
use crate::store::KeysLocation;
pub use crate::tls::TlsConfig;

/// The config file as written.
#[derive(schemars::JsonSchema, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<String>,
    upstream: String,
    admin: Option<String>,
    policy: Option<PathBuf>,
    keys: Option<String>,
    key_cache: Option<PathBuf>,
    key_store: Option<KeyStoreFile>,
    deny_status: Option<u16>,
    upstream_connect_timeout: Option<String>,
    upstream_timeout: Option<String>,
    max_header_bytes: Option<usize>,
    filter_max_bytes: Option<usize>,
    shadow_policy: Option<PathBuf>,
    grace_period: Option<String>,
    tls: Option<TlsConfig>,
    upstream_tls: Option<UpstreamTlsConfig>,
    metrics: Option<MetricsConfig>,
    log: Option<LogConfig>,
    key_api: Option<KeyApiConfig>,
    audit: Option<AuditConfig>,
    #[serde(default)]
    trust_forwarded: bool,
    backend: Option<BackendFile>,
    connections: Option<ConnectionsFile>,
    /// Read again with positions by `oauth::config::parse`.
    #[schemars(with = "Option<crate::oauth::config::OAuthFile>")]
    oauth: Option<serde_yaml::Value>,
}

/// The JSON Schema (draft 2020-12) of `portcullis.yaml`, generated from the types that read it.
pub fn schema() -> serde_json::Value {
    let mut schema = schemars::schema_for!(ConfigFile);
    schema.insert("title".into(), "portcullis.yaml".into());
    schema.insert(
        "$id".into(),
        "https://portcullis.dev/schema/config.json".into(),
    );
    schema.to_value()
}

/// `key_store:` as written.
#[derive(schemars::JsonSchema, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyStoreFile {
    notify: Option<bool>,
    poll_interval: Option<String>,
    usage_flush_interval: Option<String>,
}

/// `key_store:`: how a proxy follows a PostgreSQL key store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyStoreConfig {
    /// LISTEN for change notifications (turn off behind PgBouncer in transaction mode, where
    /// LISTEN does not work; the delta poll alone then carries every change).
    pub notify: bool,
    /// How often the delta poll runs even without a notification.
    pub poll_interval: Duration,
    /// How often this proxy adds its call counts to the store.
    pub usage_flush_interval: Duration,
}

impl Default for KeyStoreConfig {
    fn default() -> Self {
        KeyStoreConfig {
            notify: true,
            poll_interval: Duration::from_secs(1),
            usage_flush_interval: Duration::from_secs(10),
        }
    }
}

/// `backend:` as written: how the backend may read requests differently from the proxy.
#[derive(schemars::JsonSchema, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendFile {
    case_insensitive: Option<bool>,
    format_suffixes: Option<bool>,
    matrix_parameters: Option<String>,
    method_override: Option<bool>,
    underscores_in_headers: Option<bool>,
}

/// `connections:` as written.
#[derive(schemars::JsonSchema, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionsFile {
    max: Option<usize>,
    first_request_timeout: Option<String>,
    idle_timeout: Option<String>,
    body_timeout: Option<String>,
}

/// `connections:`: limits on client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionsConfig {
    /// Open client connections at most; `None` derives it from the file-descriptor limit.
    pub max: Option<usize>,
    /// A connection that has not completed a request head this long after it was accepted is
    /// closed (HTTP/1 with no byte, HTTP/2 with no stream, a slow head).
    pub first_request_timeout: Duration,
    /// A keep-alive connection with no request in flight and no bytes for this long is closed.
    pub idle_timeout: Duration,
    /// A request body that pauses this long answers 408.
    pub body_timeout: Duration,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            max: None,
            first_request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// `key_api:`: the self-service key API on the main listener.
#[derive(schemars::JsonSchema, Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyApiConfig {
    /// Reserved path prefix (default `/_portcullis/v1/keys`).
    #[serde(default = "default_key_api_prefix")]
    pub prefix: String,
    /// `false` turns the API off (requests under the prefix then follow the policy).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Keys one principal may hold at most (creates beyond it answer 409).
    #[serde(default = "default_max_keys")]
    pub max_keys_per_principal: usize,
}

fn default_max_keys() -> usize {
    100
}

impl Default for KeyApiConfig {
    fn default() -> Self {
        KeyApiConfig {
            max_keys_per_principal: default_max_keys(),
            prefix: default_key_api_prefix(),
            enabled: true,
        }
    }
}

fn default_key_api_prefix() -> String {
    "/_portcullis/v1/keys".to_string()
}

fn default_true() -> bool {
    true
}

/// `upstream_tls:`: trust for an https upstream.
#[derive(schemars::JsonSchema, Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// CA bundle, PEM; without it the system roots are used.
    pub ca: Option<PathBuf>,
}

/// `metrics:`.
#[derive(schemars::JsonSchema, Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Per-key Prometheus series (one series per key: mind the cardinality).
    #[serde(default)]
    pub per_key: bool,
}

/// `log:`.
#[derive(schemars::JsonSchema, Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    pub format: Option<String>,
    /// A filter like `info` or `portcullis=debug` (RUST_LOG syntax); `PORTCULLIS_LOG` overrides.
    pub level: Option<String>,
    /// One log line per request.
    #[serde(default)]
    pub access_log: bool,
}

/// The validated process configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// The backend's base URI (`http://host:port`).
    pub upstream: http::Uri,
    /// The admin listener.
    pub admin: SocketAddr,
    /// Policy file path (absolute or relative to the working directory).
    pub policy: PathBuf,
    /// Where keys live: a keys file or a PostgreSQL URL.
    pub keys: KeysLocation,
    /// With a PostgreSQL store: the last state loaded, to start from while the database is down.
    pub key_cache: Option<PathBuf>,
    /// How a PostgreSQL store is followed.
    pub key_store: KeyStoreConfig,
    /// Status for a valid key without permission: 403 (default) or 401.
    pub deny_status: http::StatusCode,
    /// Upper bound on connecting to the backend (→ 502).
    pub upstream_connect_timeout: Duration,
    /// Upper bound on waiting for the backend's response head (→ 504).
    pub upstream_timeout: Duration,
    /// Largest total size of request headers accepted (→ 431).
    pub max_header_bytes: usize,
    /// Largest answer a filtered route reads to filter it (→ 502 beyond).
    pub filter_max_bytes: usize,
    /// A policy every request is also decided with, never enforced (`shadow_policy:`).
    pub shadow_policy: Option<PathBuf>,
    /// How long in-flight requests get after SIGTERM.
    pub grace_period: Duration,
    /// TLS termination, when configured.
    pub tls: Option<TlsConfig>,
    /// Trust for an https upstream.
    pub upstream_tls: UpstreamTlsConfig,
    /// Metrics options.
    pub metrics: MetricsConfig,
    /// Logging options.
    pub log: LogConfig,
    /// The self-service key API.
    pub key_api: KeyApiConfig,
    /// The audit stream, when configured.
    pub audit: Option<AuditConfig>,
    /// Keep (append to) the client's forwarding headers: only behind a proxy you trust.
    pub trust_forwarded: bool,
    /// How the backend may read requests; the proxy refuses what it could misread.
    pub backend: BackendConfig,
    /// Client connection limits and timeouts.
    pub connections: ConnectionsConfig,
    /// OAuth access tokens, when configured.
    pub oauth: Option<crate::oauth::OAuthConfig>,
}

impl Config {
    /// The defaults for everything but the upstream.
    pub fn with_upstream(upstream: http::Uri) -> Config {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            upstream,
            admin: SocketAddr::from(([127, 0, 0, 1], 9901)),
            policy: PathBuf::from("policy.yaml"),
            keys: KeysLocation::File(PathBuf::from("keys.yaml")),
            key_cache: None,
            key_store: KeyStoreConfig::default(),
            deny_status: http::StatusCode::FORBIDDEN,
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            max_header_bytes: 32 * 1024,
            filter_max_bytes: 8 * 1024 * 1024,
            shadow_policy: None,
            grace_period: Duration::from_secs(25),
            tls: None,
            upstream_tls: UpstreamTlsConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            key_api: KeyApiConfig::default(),
            audit: None,
            trust_forwarded: false,
            backend: BackendConfig::default(),
            connections: ConnectionsConfig::default(),
            oauth: None,
        }
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, FileProblems> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| FileProblems::single(path, format!("cannot read config: {e}")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&source, base).map_err(|p| FileProblems::new(path, p))
    }

    /// Parses config text; relative paths resolve against `base`.
    pub fn parse(source: &str, base: &Path) -> Result<Config, Vec<Problem>> {
        let file: ConfigFile =
            serde_yaml::from_str(source).map_err(|e| vec![diagnostic::from_serde_yaml(&e)])?;
        let mut problems = Vec::new();
        let mut problems_from_oauth = Vec::new();
        let mut fail = |field: &str, message: String| {
            let (line, column) = locate_field(source, field);
            problems.push(Problem::at(line, column, message));
        };
        let upstream = match parse_upstream(&file.upstream) {
            Ok(u) => u,
            Err(e) => {
                fail("upstream", e);
                http::Uri::from_static("http://127.0.0.1")
            }
        };
        let mut config = Config::with_upstream(upstream);
        let addr = |field: &str, text: &Option<String>, default: SocketAddr| {
            match text {
            None => Ok(default),
            Some(t) => parse_listen(t).ok_or_else(|| {
                (
                    field.to_string(),
                    format!(
                        "{field}: {t:?} is not an address like 127.0.0.1:8080, [::1]:8080 or :8080 (every interface)"
                    ),
                )
            }),
        }
        };
        match addr("listen", &file.listen, config.listen) {
            Ok(a) => config.listen = a,
            Err((f, m)) => fail(&f, m),
        }
        match addr("admin", &file.admin, config.admin) {
            Ok(a) => config.admin = a,
            Err((f, m)) => fail(&f, m),
        }
        config.policy = base.join(file.policy.unwrap_or(config.policy));
        match KeysLocation::parse(file.keys.as_deref().unwrap_or("keys.yaml"), base) {
            Ok(keys) => config.keys = keys,
            Err(e) => fail("keys", e),
        }
        config.key_cache = file.key_cache.map(|c| base.join(c));
        config.shadow_policy = file.shadow_policy.map(|p| base.join(p));
        if let Some(k) = &file.key_store {
            let ks = &mut config.key_store;
            ks.notify = k.notify.unwrap_or(ks.notify);
            for (name, text, slot) in [
                ("poll_interval", &k.poll_interval, &mut ks.poll_interval),
                (
                    "usage_flush_interval",
                    &k.usage_flush_interval,
                    &mut ks.usage_flush_interval,
                ),
            ] {
                if let Some(t) = text {
                    match humantime::parse_duration(t) {
                        Ok(d) if d >= Duration::from_millis(100) => *slot = d,
                        _ => fail(
                            "key_store",
                            format!("key_store.{name}: {t:?} is not a duration of at least 100ms"),
                        ),
                    }
                }
            }
        }
        match file.deny_status {
            None => {}
            Some(401) => config.deny_status = http::StatusCode::UNAUTHORIZED,
            Some(403) => config.deny_status = http::StatusCode::FORBIDDEN,
            Some(other) => fail(
                "deny_status",
                format!("deny_status must be 401 or 403, not {other}"),
            ),
        }
        config.tls = file.tls.map(|mut t| {
            t.cert = base.join(&t.cert);
            t.key = base.join(&t.key);
            t.client_ca = t.client_ca.map(|c| base.join(c));
            t
        });
        config.upstream_tls = file.upstream_tls.unwrap_or_default();
        config.upstream_tls.ca = config.upstream_tls.ca.take().map(|c| base.join(c));
        config.metrics = file.metrics.unwrap_or_default();
        config.log = file.log.unwrap_or_default();
        config.key_api = file.key_api.unwrap_or_default();
        config.trust_forwarded = file.trust_forwarded;
        config.backend.headers.trust_forwarded = file.trust_forwarded;
        if let Some(b) = &file.backend {
            let reading = &mut config.backend.reading;
            reading.case_insensitive = b.case_insensitive.unwrap_or(reading.case_insensitive);
            reading.format_suffixes = b.format_suffixes.unwrap_or(reading.format_suffixes);
            match b.matrix_parameters.as_deref() {
                None => {}
                Some("reject") => reading.matrix_parameters = MatrixParameters::Reject,
                Some("strip") => reading.matrix_parameters = MatrixParameters::Strip,
                Some("literal") => reading.matrix_parameters = MatrixParameters::Literal,
                Some(other) => fail(
                    "backend",
                    format!(
                        "backend.matrix_parameters must be reject, strip or literal, not {other:?}"
                    ),
                ),
            }
            let headers = &mut config.backend.headers;
            headers.method_override = b.method_override.unwrap_or(headers.method_override);
            headers.underscores = b.underscores_in_headers.unwrap_or(headers.underscores);
        }
        if file.oauth.is_some() {
            match crate::oauth::config::parse(source, base) {
                Ok(oauth) => config.oauth = oauth,
                Err(found) => problems_from_oauth.extend(found),
            }
        }
        if let Some(c) = &file.connections {
            let limits = &mut config.connections;
            match c.max {
                Some(0) => fail("connections", "connections.max must be at least 1".into()),
                max => limits.max = max.or(limits.max),
            }
            for (name, text, slot) in [
                (
                    "first_request_timeout",
                    &c.first_request_timeout,
                    &mut limits.first_request_timeout,
                ),
                ("idle_timeout", &c.idle_timeout, &mut limits.idle_timeout),
                ("body_timeout", &c.body_timeout, &mut limits.body_timeout),
            ] {
                if let Some(t) = text {
                    match humantime::parse_duration(t) {
                        Ok(d) if !d.is_zero() => *slot = d,
                        _ => fail(
                            "connections",
                            format!("connections.{name}: {t:?} is not a duration like 30s"),
                        ),
                    }
                }
            }
        }
        if let Some(mut audit) = file.audit {
            audit.resolve_paths(base);
            if let Err(messages) = audit.validate() {
                for m in messages {
                    fail("audit", format!("audit: {m}"));
                }
            }
            config.audit = Some(audit);
        }
        let prefix = &config.key_api.prefix;
        let prefix_ok = crate::path::normalise(prefix).is_ok_and(|n| n == *prefix)
            && prefix.len() > 1
            && !prefix.ends_with('/');
        if !prefix_ok {
            fail(
                "key_api",
                format!(
                    "key_api.prefix {prefix:?} must be a normalised path like /_portcullis/v1/keys"
                ),
            );
        }
        if let Some(f) = config.log.format.as_deref() {
            if f != "text" && f != "json" {
                fail("log", format!("log.format must be text or json, not {f:?}"));
            }
        }
        for (field, text, slot) in [
            ("grace_period", &file.grace_period, &mut config.grace_period),
            (
                "upstream_connect_timeout",
                &file.upstream_connect_timeout,
                &mut config.upstream_connect_timeout,
            ),
            (
                "upstream_timeout",
                &file.upstream_timeout,
                &mut config.upstream_timeout,
            ),
        ] {
            if let Some(t) = text {
                match humantime::parse_duration(t) {
                    Ok(d) if !d.is_zero() => *slot = d,
                    _ => fail(
                        field,
                        format!("{field}: {t:?} is not a duration like 5s or 1m"),
                    ),
                }
            }
        }
        if let Some(n) = file.max_header_bytes {
            if !(1024..=1024 * 1024).contains(&n) {
                fail(
                    "max_header_bytes",
                    "max_header_bytes must be between 1024 and 1048576".into(),
                );
            } else {
                config.max_header_bytes = n;
            }
        }
        if let Some(n) = file.filter_max_bytes {
            if !(1024..=1024 * 1024 * 1024).contains(&n) {
                fail(
                    "filter_max_bytes",
                    "filter_max_bytes must be between 1024 and 1073741824".into(),
                );
            } else {
                config.filter_max_bytes = n;
            }
        }
        problems.extend(problems_from_oauth);
        if problems.is_empty() {
            Ok(config)
        } else {
            problems.sort_by_key(|p| (p.line, p.column));
            Err(problems)
        }
    }
}

fn parse_upstream(text: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = text
        .parse()
        .map_err(|e| format!("upstream: {text:?} is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(format!(
                "upstream: {text:?} must start with http:// or https://"
            ))
        }
    }
    if uri.authority().is_none() {
        return Err(format!("upstream: {text:?} has no host"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "upstream: {text:?} must not have a path; the request path is kept as is"
        ));
    }
    Ok(uri)
}

/// The position of a top-level `field:` in the text, for error messages.
fn locate_field(source: &str, field: &str) -> (usize, usize) {
    let needle = format!("{field}:");
    source
        .lines()
        .position(|l| l.starts_with(&needle))
        .map_or((1, 1), |i| (i + 1, 1))
}

/// A listen address: `HOST:PORT` with an IP, or `:PORT` for every IPv4 interface (as Go and
/// nginx read it).
pub fn parse_listen(text: &str) -> Option<SocketAddr> {
    match text.strip_prefix(':') {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .map(|p| SocketAddr::from(([0, 0, 0, 0], p))),
        None => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn listen_accepts_a_bare_port_for_every_interface() {
        assert_eq!(
            parse_listen(":8080"),
            Some(SocketAddr::from(([0, 0, 0, 0], 8080)))
        );
        assert_eq!(
            parse_listen("127.0.0.1:9"),
            Some(SocketAddr::from(([127, 0, 0, 1], 9)))
        );
        assert_eq!(parse_listen(":x"), None);
        assert_eq!(parse_listen("nowhere"), None);
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = Config::parse("upstream: http://127.0.0.1:3000\n", Path::new("/etc/p")).unwrap();
        assert_eq!(c.policy, PathBuf::from("/etc/p/policy.yaml"));
        assert_eq!(c.deny_status, http::StatusCode::FORBIDDEN);
        assert_eq!(c.admin.to_string(), "127.0.0.1:9901");
    }

    #[test]
    fn reports_each_bad_field() {
        let text = "upstream: ftp://x\nlisten: nowhere\ndeny_status: 500\nupstream_timeout: soon\n";
        let problems = Config::parse(text, Path::new(".")).unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert_eq!(
            problems.iter().map(|p| p.line).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
    }

    #[test]
    fn unknown_field_is_an_error() {
        let problems = Config::parse("upstream: http://x\nlisen: 1\n", Path::new(".")).unwrap_err();
        assert_eq!(problems[0].line, 2);
    }
}
