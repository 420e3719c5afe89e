//! Putting portcullis beside an existing workload in Kubernetes, like `linkerd inject`.
//!
//! This sits outside the request flow: it rewrites pod specs so that the proxy runs as a native
//! sidecar (an init container with `restartPolicy: Always`) on the pod's public port and forwards
//! to the app on `127.0.0.1`. [`plan`] is the one pure place that decides what changes; it yields
//! RFC 6902 operations that [`inject_stream`] applies to YAML documents (`portcullis inject`) and
//! [`review`] returns to the API server (`portcullis injector`, a mutating admission webhook).

mod plan;
mod review;
mod server;
mod sidecar;
mod stream;

pub use plan::pod_patch;
pub use review::review;
pub use server::{run_injector, serve};
pub use stream::{inject_stream, inject_stream_with_warnings, Injected};

/// Pod annotation that asks the webhook for injection (`"true"`); `"false"` also makes
/// `portcullis inject` leave the workload alone.
pub const INJECT_ANNOTATION: &str = "portcullis.dev/inject";
/// Pod annotation that marks a pod as injected, so a second run changes nothing.
pub const INJECTED_ANNOTATION: &str = "portcullis.dev/injected";
/// Pod annotation holding the sidecar's `portcullis.yaml`, mounted through the downward API.
/// Kept as is when present before injection (the operator wrote it).
pub const CONFIG_ANNOTATION: &str = "portcullis.dev/config";
/// Per-pod override of [`InjectOptions::app_port`].
pub const APP_PORT_ANNOTATION: &str = "portcullis.dev/app-port";
/// Per-pod override of [`InjectOptions::config_map`].
pub const POLICY_ANNOTATION: &str = "portcullis.dev/policy-configmap";
/// Per-pod override of [`InjectOptions::secret`].
pub const KEYS_ANNOTATION: &str = "portcullis.dev/keys-secret";
/// Per-pod override of [`InjectOptions::audit_syslog`]: the SIEM's `audit.syslog.url`.
pub const AUDIT_SYSLOG_ANNOTATION: &str = "portcullis.dev/audit-syslog";
/// Per-pod override of [`InjectOptions::audit_tls_secret`].
pub const AUDIT_TLS_SECRET_ANNOTATION: &str = "portcullis.dev/audit-tls-secret";
/// Per-pod override of [`InjectOptions::audit_client_cert`] (`"true"` or `"false"`).
pub const AUDIT_CLIENT_CERT_ANNOTATION: &str = "portcullis.dev/audit-client-cert";
/// The sidecar's container name.
pub const SIDECAR_NAME: &str = "portcullis";

/// What to inject and where it listens.
#[derive(Debug, Clone)]
pub struct InjectOptions {
    /// The portcullis image for the sidecar.
    pub image: String,
    /// Where the proxy listens in the pod (the port clients and Services reach).
    pub proxy_port: u16,
    /// The admin listener (probes, metrics).
    pub admin_port: u16,
    /// The app's port on 127.0.0.1; `None`: the first container's first `containerPort`.
    pub app_port: Option<u16>,
    /// ConfigMap holding `policy.yaml`.
    pub config_map: String,
    /// Secret holding `keys.yaml`.
    pub secret: String,
    /// Audit to this syslog URL (`tls://siem:6514`, `tcp://...`, `udp://...`); the spool goes
    /// on the writable spool volume. `None`: the generated config has no `audit:` block.
    pub audit_syslog: Option<String>,
    /// Secret mounted read-only at `/etc/portcullis/audit-tls`: `ca.crt` is the CA that signs
    /// the SIEM's certificate (`audit.syslog.ca`), and with [`Self::audit_client_cert`] `tls.crt`
    /// and `tls.key` are the client certificate for mutual TLS (the layout of a cert-manager
    /// Certificate's Secret).
    pub audit_tls_secret: Option<String>,
    /// Send `tls.crt`/`tls.key` of [`Self::audit_tls_secret`] as client certificate.
    pub audit_client_cert: bool,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: format!("portcullis:{}", env!("CARGO_PKG_VERSION")),
            proxy_port: 8080,
            admin_port: 9901,
            app_port: None,
            config_map: "portcullis-policy".into(),
            secret: "portcullis-keys".into(),
            audit_syslog: None,
            audit_tls_secret: None,
            audit_client_cert: false,
        }
    }
}

impl InjectOptions {
    /// Checks the options that no pod annotation can repair, so a bad flag stops `inject` and
    /// `injector` at once instead of failing every pod.
    pub fn validate(&self) -> Result<(), InjectError> {
        plan::check_audit(self, "--audit-syslog", "--audit-tls-secret")
    }
}

/// The injection flags shared by `portcullis inject` and `portcullis injector`.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// The sidecar image (default: portcullis:VERSION).
    #[arg(long, env = "PORTCULLIS_INJECT_IMAGE")]
    pub image: Option<String>,
    /// Port the proxy listens on in the pod (Services should target it).
    #[arg(long, default_value_t = 8080)]
    pub proxy_port: u16,
    /// Port of the admin listener (probes, metrics).
    #[arg(long, default_value_t = 9901)]
    pub admin_port: u16,
    /// The app's port (default: the first container's first containerPort).
    #[arg(long)]
    pub app_port: Option<u16>,
    /// ConfigMap holding policy.yaml.
    #[arg(long, default_value = "portcullis-policy")]
    pub config_map: String,
    /// Secret holding keys.yaml.
    #[arg(long, default_value = "portcullis-keys")]
    pub secret: String,
    /// Audit every injected pod to this syslog URL, e.g. tls://siem.example.com:6514 (the
    /// spool goes on the pod's spool volume; pods override it with portcullis.dev/audit-syslog).
    #[arg(long, value_name = "URL")]
    pub audit_syslog: Option<String>,
    /// Secret with the SIEM's CA (ca.crt) and, with --audit-client-cert, a client certificate
    /// (tls.crt, tls.key), mounted read-only into the sidecar.
    #[arg(long, value_name = "SECRET")]
    pub audit_tls_secret: Option<String>,
    /// Send tls.crt/tls.key from --audit-tls-secret as client certificate (mutual TLS).
    #[arg(long)]
    pub audit_client_cert: bool,
}

impl From<InjectArgs> for InjectOptions {
    fn from(args: InjectArgs) -> Self {
        InjectOptions {
            image: args.image.unwrap_or_else(|| InjectOptions::default().image),
            proxy_port: args.proxy_port,
            admin_port: args.admin_port,
            app_port: args.app_port,
            config_map: args.config_map,
            secret: args.secret,
            audit_syslog: args.audit_syslog,
            audit_tls_secret: args.audit_tls_secret,
            audit_client_cert: args.audit_client_cert,
        }
    }
}

/// `portcullis inject`: reads the manifests on stdin and writes the injected stream to stdout.
/// Warnings (say, a Service that sends clients around the proxy) go to stderr; they do not
/// change the exit code.
pub fn inject_stdio(options: &InjectOptions) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    options.validate()?;
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| anyhow::anyhow!("cannot read the manifests from stdin: {e}"))?;
    let injected = inject_stream_with_warnings(&input, options)?;
    for warning in &injected.warnings {
        eprintln!("portcullis inject: warning: {warning}");
    }
    std::io::stdout().write_all(injected.output.as_bytes())?;
    Ok(())
}

/// Why a pod cannot be injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// The object has no pod spec where one was expected.
    #[error("no pod spec (spec.containers) found")]
    NoPodSpec,
    /// Nothing says which port the app listens on.
    #[error(
        "cannot tell the app's port: the first container declares no containerPort; \
         pass --app-port or annotate the pod with portcullis.dev/app-port"
    )]
    NoAppPort,
    /// The proxy or admin port collides with a port already in the pod.
    #[error("port {port} is needed for the portcullis {role} but {owner}; choose another port")]
    PortTaken {
        /// The colliding port.
        port: u16,
        /// `proxy` or `admin`.
        role: &'static str,
        /// Who holds it.
        owner: String,
    },
    /// A name the sidecar needs is already used in the pod.
    #[error("the pod already has a {what} named {name:?}")]
    NameTaken {
        /// `volume` or `port`.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// The pod shares the node's network namespace.
    #[error("hostNetwork pods cannot be injected: the proxy would listen on the node itself")]
    HostNetwork,
    /// The audit settings cannot work (a bad URL, TLS files without `tls://`, an operator's
    /// config whose spool would land on the read-only config mount).
    #[error("{0}")]
    Audit(String),
    /// A portcullis annotation has a value that makes no sense.
    #[error("annotation {key}: {value:?} is not valid ({why})")]
    BadAnnotation {
        /// The annotation.
        key: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        why: &'static str,
    },
}
