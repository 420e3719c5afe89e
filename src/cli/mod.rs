//! The command line: argument definitions and the commands that are not `run`.

pub mod check;
pub mod explain;
pub mod keys;
pub mod replay;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// API-key enforcement sidecar.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve: enforce the policy in front of the upstream.
    Run {
        /// Process config file.
        #[arg(short, long, default_value = "portcullis.yaml")]
        config: PathBuf,
    },
    /// Start a built-in backend and the proxy with an example policy and fresh keys.
    Demo {
        /// Where the demo proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// Validate config, policy and keys; print every problem as file:line:column: message.
    Check(FileArgs),
    /// Manage the keys file.
    Keys(KeysArgs),
    /// Explain the decision for a caller (a key, a token, a principal, or nobody) and a request.
    Explain {
        /// Files to read.
        #[command(flatten)]
        files: FileArgs,
        /// The key's public id.
        #[arg(long, conflicts_with_all = ["token_file", "principal"])]
        key_id: Option<String>,
        /// A file holding an OAuth access token (its claims are read, its signature not checked).
        #[arg(long, conflicts_with = "principal")]
        token_file: Option<PathBuf>,
        /// A principal, as a token's principal claim would name it.
        #[arg(long)]
        principal: Option<String>,
        /// A token scope narrowing `--principal`; repeat for several.
        #[arg(long = "scope", requires = "principal")]
        scopes: Vec<String>,
        /// HTTP method, e.g. GET.
        method: String,
        /// Request path, e.g. /v1/datasets/ds_1.
        path: String,
    },
    /// Decide every audited decision again with a new policy and print what would change.
    /// Exit 0 when nothing changes, 1 when something does, 64 when a file cannot be read.
    Replay {
        /// The policy to try.
        #[arg(long)]
        policy: PathBuf,
        /// Keys (file or PostgreSQL URL), so keys' scopes narrow them as in the proxy; without
        /// it each event's principal is replayed with its full access.
        #[arg(long)]
        keys: Option<String>,
        /// The audit stream as JSON lines (`audit.file`).
        audit: PathBuf,
    },
    /// Print the JSON Schema (draft 2020-12) of a policy file or of portcullis.yaml, for editors.
    Schema {
        /// Which file.
        #[arg(value_enum)]
        which: SchemaKind,
    },
    /// Add the portcullis sidecar to the workloads in a YAML stream (stdin to stdout).
    Inject(crate::inject::InjectArgs),
    /// Mutating admission webhook that injects pods annotated portcullis.dev/inject: "true".
    Injector {
        /// Where to listen (HTTPS).
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: std::net::SocketAddr,
        /// Serving certificate chain, PEM.
        #[arg(long)]
        cert: PathBuf,
        /// Its private key, PEM.
        #[arg(long)]
        key: PathBuf,
        /// What to inject.
        #[command(flatten)]
        options: crate::inject::InjectArgs,
    },
}

/// The files `portcullis schema` describes.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SchemaKind {
    /// A policy file (`policy.yaml`).
    Policy,
    /// The process configuration (`portcullis.yaml`).
    Config,
}

/// Prints the schema.
pub fn schema(which: SchemaKind) -> Result<(), CommandError> {
    let schema = match which {
        SchemaKind::Policy => crate::policy::model::schema(),
        SchemaKind::Config => crate::config::schema(),
    };
    let text = serde_json::to_string_pretty(&schema)
        .map_err(|e| CommandError::Usage(format!("cannot render the schema: {e}")))?;
    println!("{text}");
    Ok(())
}

/// Either a config file or explicit policy/keys files.
#[derive(Debug, Args)]
pub struct FileArgs {
    /// Process config file (its policy and keys are checked too).
    #[arg(short, long, conflicts_with_all = ["policy", "keys"])]
    pub config: Option<PathBuf>,
    /// Policy file.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Keys file or PostgreSQL URL.
    #[arg(long)]
    pub keys: Option<String>,
}

/// `portcullis keys [-c portcullis.yaml] ...`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Process config whose `audit:` block receives an event for every change.
    #[arg(short, long, global = true)]
    pub config: Option<PathBuf>,
    /// The keys subcommand.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// `portcullis keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new key; prints it once on stdout and stores only its hash.
    Create {
        /// Keys file (created if missing) or PostgreSQL URL.
        #[arg(long)]
        keys: String,
        /// Owner of the key.
        #[arg(long)]
        principal: String,
        /// Narrowing grant; repeat for several.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// What the key is for.
        #[arg(long)]
        purpose: Option<String>,
        /// Expiry: a duration (90d, 12h) or an RFC 3339 time.
        #[arg(long)]
        expires: Option<String>,
        /// Policy to check the principal and scopes against.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// List keys (never the key or its hash).
    List {
        /// Keys file or PostgreSQL URL.
        #[arg(long)]
        keys: String,
        /// A running proxy's admin address (e.g. http://127.0.0.1:9901): adds calls and last use.
        #[arg(long)]
        admin: Option<String>,
        /// One JSON object per key (as the key API shows them), for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Copy a keys file into a PostgreSQL store (ids already there are skipped).
    Import {
        /// The PostgreSQL URL.
        #[arg(long)]
        keys: String,
        /// The keys file to copy.
        #[arg(long)]
        from: PathBuf,
    },
    /// Deactivate a key (it answers 401 until activated).
    Deactivate(KeyIdArgs),
    /// Activate a deactivated key.
    Activate(KeyIdArgs),
    /// Remove a key for good.
    Revoke(KeyIdArgs),
    /// Make a successor key; the old one expires after the overlap.
    Rotate {
        /// Keys file and key id.
        #[command(flatten)]
        target: KeyIdArgs,
        /// How long the old key stays valid (default 0: it stops at once).
        #[arg(long)]
        overlap: Option<String>,
    },
}

/// A keys file and one key id.
#[derive(Debug, Args)]
pub struct KeyIdArgs {
    /// Keys file or PostgreSQL URL.
    #[arg(long)]
    pub keys: String,
    /// The key's public id.
    pub id: String,
}

/// A command failure, by exit code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Bad input or configuration: exit 64.
    #[error("{0}")]
    Usage(String),
    /// Validation found problems (already printed): exit 1.
    #[error("{0} problem(s) found")]
    Problems(usize),
    /// `replay` found decisions that would change: exit 1.
    #[error("{0} decision(s) would change")]
    Changed(u64),
    /// The command line itself is incomplete: exit 2, as for any bad argument.
    #[error("{0}")]
    Arguments(String),
}

impl From<anyhow::Error> for CommandError {
    fn from(e: anyhow::Error) -> Self {
        CommandError::Usage(format!("{e:#}"))
    }
}

/// What `FileArgs` name: a policy, maybe keys, and the config they came from (if any).
pub struct Files {
    /// The policy file.
    pub policy: PathBuf,
    /// The keys, when named.
    pub keys: Option<crate::store::KeysLocation>,
    /// The process config, when `-c` (or `./portcullis.yaml`) was used.
    pub config: Option<crate::config::Config>,
}

impl Files {
    /// How the backend reads requests: from the config, or the defaults.
    pub fn backend(&self) -> crate::config::BackendConfig {
        self.config.as_ref().map(|c| c.backend).unwrap_or_default()
    }
}

/// Resolves `FileArgs` into a policy path, an optional keys path and the config.
pub fn resolve_files(files: &FileArgs) -> Result<Files, CommandError> {
    if let Some(policy) = &files.policy {
        let keys = files.keys.as_deref().map(keys_location).transpose()?;
        return Ok(Files {
            policy: policy.clone(),
            keys,
            config: None,
        });
    }
    let default = PathBuf::from("portcullis.yaml");
    let config_path = match &files.config {
        Some(path) => path,
        None if default.exists() => &default,
        None => {
            return Err(CommandError::Arguments(
                "no portcullis.yaml here: give -c CONFIG, or --policy FILE [--keys FILE]".into(),
            ))
        }
    };
    let config =
        crate::config::Config::load(config_path).map_err(|p| CommandError::Usage(p.to_string()))?;
    Ok(Files {
        policy: config.policy.clone(),
        keys: Some(config.keys.clone()),
        config: Some(config),
    })
}

/// Reads a `--keys` argument: a PostgreSQL URL, or a path relative to the working directory.
pub fn keys_location(text: &str) -> Result<crate::store::KeysLocation, CommandError> {
    crate::store::KeysLocation::parse(text, std::path::Path::new("")).map_err(CommandError::Usage)
}

/// Runs an async command body on a small runtime of its own (the CLI is otherwise sync).
pub fn block_on<T>(future: impl std::future::Future<Output = T>) -> Result<T, CommandError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CommandError::Usage(format!("cannot start the runtime: {e}")))?;
    Ok(runtime.block_on(future))
}

/// Parses `90d`, `12h` (from now) or an RFC 3339 time, into an RFC 3339 UTC string.
pub fn expiry_from(text: &str, now: time::OffsetDateTime) -> Result<String, String> {
    if let Ok(d) = humantime::parse_duration(text) {
        return later(now, d).and_then(format_time);
    }
    crate::keys::parse_time(text)
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| e.to_string()))
        .and_then(format_time)
        .map_err(|_| format!("{text:?} is neither a duration (90d, 12h) nor an RFC 3339 time"))
}

/// `now + d`, or an error instead of an overflow for absurd durations.
pub fn later(
    now: time::OffsetDateTime,
    d: std::time::Duration,
) -> Result<time::OffsetDateTime, String> {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| now.checked_add(d))
        .filter(|t| t.year() <= 9999)
        .ok_or_else(|| format!("{} is too far in the future", humantime::format_duration(d)))
}

/// The longest rotation overlap accepted.
pub const MAX_OVERLAP: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Parses a rotation overlap (at most 30 days).
pub fn parse_overlap(text: Option<&str>) -> Result<std::time::Duration, String> {
    let Some(text) = text else {
        return Ok(std::time::Duration::ZERO);
    };
    let d = humantime::parse_duration(text)
        .map_err(|_| format!("overlap {text:?} is not a duration like 1h"))?;
    if d > MAX_OVERLAP {
        return Err(format!("overlap {text:?} is longer than 30 days"));
    }
    Ok(d)
}

/// Formats a time as RFC 3339 UTC with whole seconds.
pub fn format_time(t: time::OffsetDateTime) -> Result<String, String> {
    let t = t
        .to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .map_err(|e| e.to_string())?;
    t.format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| e.to_string())
}
