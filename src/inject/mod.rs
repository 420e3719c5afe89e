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
pub use stream::inject_stream;

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
        }
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
        }
    }
}

/// `portcullis inject`: reads the manifests on stdin and writes the injected stream to stdout.
pub fn inject_stdio(options: &InjectOptions) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| anyhow::anyhow!("cannot read the manifests from stdin: {e}"))?;
    let output = inject_stream(&input, options)?;
    std::io::stdout().write_all(output.as_bytes())?;
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
