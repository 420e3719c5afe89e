//! The one decision of injection: which RFC 6902 operations turn a pod into an injected pod.
//!
//! Pure (no I/O). The operations only ever `add` (new members, array inserts) or `replace`
//! (an app port that hands its name to the proxy, a probe that named that port), so they apply
//! with any JSON Patch implementation and with [`apply`] on YAML documents.

use serde_yaml::{Mapping, Value};

use super::sidecar::{
    Sidecar, ADMIN_PORT_NAME, AUDIT_SPOOL_DIR, AUDIT_TLS_DIR, CONFIG_PATH, PROXY_PORT_NAME,
    SPOOL_DIR, SPOOL_VOLUME, VOLUME_NAMES,
};
use super::{
    InjectError, InjectOptions, APP_PORT_ANNOTATION, AUDIT_CLIENT_CERT_ANNOTATION,
    AUDIT_SYSLOG_ANNOTATION, AUDIT_TLS_SECRET_ANNOTATION, CONFIG_ANNOTATION, INJECTED_ANNOTATION,
    KEYS_ANNOTATION, POLICY_ANNOTATION, SIDECAR_NAME,
};

/// One JSON Patch operation (only the two kinds injection needs).
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    /// `add` or `replace`.
    pub op: &'static str,
    /// JSON Pointer (RFC 6901).
    pub path: String,
    /// The value to put there.
    pub value: Value,
}

impl Op {
    fn add(path: String, value: Value) -> Op {
        Op {
            op: "add",
            path,
            value,
        }
    }

    fn replace(path: String, value: Value) -> Op {
        Op {
            op: "replace",
            path,
            value,
        }
    }

    /// The operation as RFC 6902 JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "op": self.op,
            "path": self.path,
            "value": serde_json::to_value(&self.value).unwrap_or_default(),
        })
    }
}

/// The JSONPatch (RFC 6902) operations that turn this pod spec into an injected one (empty when
/// already injected, and when it cannot be injected: [`try_pod_patch`] says why).
pub fn pod_patch(
    pod: &serde_json::Value,
    options: &InjectOptions,
    path_prefix: &str,
) -> Vec<serde_json::Value> {
    try_pod_patch(pod, options, path_prefix).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "pod not injected");
        Vec::new()
    })
}

/// Like [`pod_patch`], with the reason when the pod cannot be injected.
pub fn try_pod_patch(
    pod: &serde_json::Value,
    options: &InjectOptions,
    path_prefix: &str,
) -> Result<Vec<serde_json::Value>, InjectError> {
    let pod = serde_yaml::to_value(pod).map_err(|_| InjectError::NoPodSpec)?;
    Ok(plan(&pod, options, path_prefix)?
        .iter()
        .map(Op::to_json)
        .collect())
}

/// Whether the pod already carries the sidecar (by marker or by container name).
pub fn is_injected(pod: &Value) -> bool {
    let marked = annotations(pod).is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    let named = ["initContainers", "containers"].iter().any(|list| {
        sequence(pod.get("spec"), list)
            .iter()
            .any(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_NAME))
    });
    marked || named
}

/// The operations for the pod at `prefix` (`""` for a Pod, `/spec/template` for a Deployment).
pub fn plan(pod: &Value, options: &InjectOptions, prefix: &str) -> Result<Vec<Op>, InjectError> {
    plan_pod(pod, options, prefix, false)
}

/// [`plan`], where `spool_claim` says that the workload provides the spool volume itself (a
/// StatefulSet's `volumeClaimTemplates` entry named `portcullis-spool`).
pub fn plan_pod(
    pod: &Value,
    options: &InjectOptions,
    prefix: &str,
    spool_claim: bool,
) -> Result<Vec<Op>, InjectError> {
    if is_injected(pod) {
        return Ok(Vec::new());
    }
    let spec = pod.get("spec").filter(|s| s.is_mapping());
    let containers = sequence(spec, "containers");
    if containers.is_empty() {
        return Err(InjectError::NoPodSpec);
    }
    if spec
        .and_then(|s| s.get("hostNetwork"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        return Err(InjectError::HostNetwork);
    }
    let options = with_overrides(options, annotations(pod))?;
    let app_port = match options.app_port {
        Some(p) => p,
        None => first_port(containers).ok_or(InjectError::NoAppPort)?,
    };
    check_ports(spec, &options, app_port)?;
    check_names(spec)?;
    match annotations(pod)
        .and_then(|a| a.get(CONFIG_ANNOTATION))
        .and_then(Value::as_str)
    {
        Some(written) => check_written_config(written, annotations(pod))?,
        None => check_audit_combination(&options)?,
    }
    let handover = find_app_port(containers, app_port);
    let proxy_port_name = handover
        .as_ref()
        .and_then(|h| h.name.clone())
        .unwrap_or_else(|| PROXY_PORT_NAME.to_string());
    let spool_provided = spool_claim
        || sequence(spec, "volumes")
            .iter()
            .any(|v| v.get("name").and_then(Value::as_str) == Some(SPOOL_VOLUME));
    let sidecar = Sidecar {
        options,
        app_port,
        proxy_port_name,
        spool_provided,
    };
    let mut ops = annotation_ops(pod, &sidecar, prefix);
    ops.push(init_container_op(spec, &sidecar, prefix)?);
    if let Some(h) = &handover {
        ops.extend(handover_ops(containers, h, app_port, prefix));
    }
    ops.extend(volume_ops(spec, &sidecar, prefix)?);
    Ok(ops)
}

fn annotations(pod: &Value) -> Option<&Mapping> {
    pod.get("metadata")?.get("annotations")?.as_mapping()
}

fn sequence<'a>(parent: Option<&'a Value>, field: &str) -> &'a [Value] {
    parent
        .and_then(|p| p.get(field))
        .and_then(Value::as_sequence)
        .map_or(&[], Vec::as_slice)
}

fn port_number(port: &Value) -> Option<u16> {
    port.get("containerPort")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
}

fn first_port(containers: &[Value]) -> Option<u16> {
    sequence(containers.first(), "ports")
        .first()
        .and_then(port_number)
}

/// Applies the per-pod annotations over the global options.
fn with_overrides(
    options: &InjectOptions,
    annotations: Option<&Mapping>,
) -> Result<InjectOptions, InjectError> {
    let mut options = options.clone();
    let Some(annotations) = annotations else {
        return Ok(options);
    };
    let get = |key: &str| annotations.get(key).and_then(Value::as_str);
    if let Some(text) = get(APP_PORT_ANNOTATION) {
        let port = text.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
            InjectError::BadAnnotation {
                key: APP_PORT_ANNOTATION,
                value: text.into(),
                why: "expected a port number",
            }
        })?;
        options.app_port = Some(port);
    }
    for (key, slot) in [
        (POLICY_ANNOTATION, &mut options.config_map),
        (KEYS_ANNOTATION, &mut options.secret),
    ] {
        if let Some(name) = get(key) {
            if !is_dns_label(name) {
                return Err(InjectError::BadAnnotation {
                    key,
                    value: name.into(),
                    why: "expected a Kubernetes object name",
                });
            }
            *slot = name.to_string();
        }
    }
    if let Some(name) = get(AUDIT_TLS_SECRET_ANNOTATION) {
        if !is_dns_label(name) {
            return Err(InjectError::BadAnnotation {
                key: AUDIT_TLS_SECRET_ANNOTATION,
                value: name.into(),
                why: "expected a Kubernetes Secret name",
            });
        }
        options.audit_tls_secret = Some(name.to_string());
    }
    if let Some(url) = get(AUDIT_SYSLOG_ANNOTATION) {
        check_syslog_url(AUDIT_SYSLOG_ANNOTATION, url)?;
        options.audit_syslog = Some(url.to_string());
    }
    if let Some(text) = get(AUDIT_CLIENT_CERT_ANNOTATION) {
        options.audit_client_cert = match text {
            "true" => true,
            "false" => false,
            _ => {
                return Err(InjectError::BadAnnotation {
                    key: AUDIT_CLIENT_CERT_ANNOTATION,
                    value: text.into(),
                    why: "expected \"true\" or \"false\"",
                })
            }
        };
    }
    Ok(options)
}

/// The flags' own audit settings: a URL portcullis accepts and a Secret name Kubernetes does.
pub(super) fn check_audit(
    options: &InjectOptions,
    url_flag: &str,
    secret_flag: &str,
) -> Result<(), InjectError> {
    if let Some(url) = &options.audit_syslog {
        check_syslog_url(url_flag, url)?;
    }
    if let Some(name) = &options.audit_tls_secret {
        if !is_dns_label(name) {
            return Err(InjectError::Audit(format!(
                "{secret_flag}: {name:?} is not a Kubernetes Secret name"
            )));
        }
    }
    Ok(())
}

/// `url` as `audit.syslog.url` would take it, checked by the config's own parser.
fn check_syslog_url(what: &str, url: &str) -> Result<(), InjectError> {
    use crate::audit::{AuditConfig, SyslogConfig};
    // Checking a tls:// URL would read CA files that exist only inside the pod; the host and
    // port rules are the same for tcp://.
    let probe = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("tls") => format!("tcp://{rest}"),
        _ => url.to_string(),
    };
    let config = AuditConfig {
        syslog: Some(SyslogConfig {
            url: probe,
            spool_dir: Some(AUDIT_SPOOL_DIR.into()),
            hostname: Some("inject".into()),
            ..SyslogConfig::default()
        }),
        ..AuditConfig::default()
    };
    let printable = url.bytes().all(|b| b.is_ascii_graphic());
    if printable && config.validate().is_ok() {
        return Ok(());
    }
    Err(InjectError::Audit(format!(
        "{what}: {url:?} is not a syslog URL: expected tls://HOST[:PORT] (TLS, port 6514 by \
         default), tcp://HOST[:PORT] or udp://HOST[:PORT]"
    )))
}

/// The audit settings of one pod, for the config injection writes.
fn check_audit_combination(options: &InjectOptions) -> Result<(), InjectError> {
    let tls = options
        .audit_syslog
        .as_deref()
        .and_then(|u| u.split_once("://"))
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("tls"));
    if options.audit_client_cert && options.audit_tls_secret.is_none() {
        return Err(InjectError::Audit(format!(
            "a client certificate for the SIEM ({AUDIT_CLIENT_CERT_ANNOTATION} or \
             --audit-client-cert) comes from the audit TLS Secret: name it with \
             {AUDIT_TLS_SECRET_ANNOTATION} or --audit-tls-secret"
        )));
    }
    match (&options.audit_syslog, &options.audit_tls_secret) {
        (Some(url), Some(secret)) if !tls => Err(InjectError::Audit(format!(
            "the audit TLS Secret {secret:?} is for a tls:// SIEM, but the syslog URL is {url:?}"
        ))),
        _ => Ok(()),
    }
}

/// A `portcullis.dev/config` the operator wrote is kept, but not when it cannot start: an audit
/// spool or JSON-lines file without an absolute path lands beside the config, on the read-only
/// downward-API mount, and `run` exits 64 there.
fn check_written_config(text: &str, annotations: Option<&Mapping>) -> Result<(), InjectError> {
    if annotations.is_some_and(|a| a.contains_key(AUDIT_SYSLOG_ANNOTATION)) {
        return Err(InjectError::Audit(format!(
            "{AUDIT_SYSLOG_ANNOTATION} only applies to the config injection writes, and this pod \
             brings its own {CONFIG_ANNOTATION}: put the audit block into that config instead \
             (audit.syslog.url, spool_dir: {AUDIT_SPOOL_DIR}, ca: {AUDIT_TLS_DIR}/ca.crt)"
        )));
    }
    let Ok(config) = serde_yaml::from_str::<Value>(text) else {
        return Ok(()); // `run` reports it with line and column
    };
    let Some(audit) = config.get("audit") else {
        return Ok(());
    };
    let config_dir = CONFIG_PATH.rsplit_once('/').map_or(CONFIG_PATH, |(d, _)| d);
    if let Some(syslog) = audit.get("syslog").filter(|s| s.is_mapping()) {
        let spool = syslog.get("spool_dir").and_then(Value::as_str);
        if !spool.is_some_and(|p| p.starts_with('/')) {
            return Err(InjectError::Audit(format!(
                "{CONFIG_ANNOTATION}: audit.syslog.spool_dir is {}, so the spool would be \
                 {config_dir}/{}, on the read-only config mount, and the sidecar would exit 64: \
                 set spool_dir: {AUDIT_SPOOL_DIR} (on the writable volume at {SPOOL_DIR})",
                spool.map_or("not set".to_string(), |p| format!("{p:?}")),
                spool.unwrap_or("spool"),
            )));
        }
    }
    if let Some(file) = audit.get("file").and_then(Value::as_str) {
        if file != "-" && !file.starts_with('/') {
            return Err(InjectError::Audit(format!(
                "{CONFIG_ANNOTATION}: audit.file {file:?} would be written beside the config, on \
                 the read-only config mount: use \"-\" (stdout, for kubectl logs) or a path \
                 under {SPOOL_DIR}"
            )));
        }
    }
    Ok(())
}

/// The port the sidecar forwards to for this pod (template), injected or not; `None` when it
/// cannot be told (the injection itself then says why).
pub fn app_port_of(pod: &Value, options: &InjectOptions) -> Option<u16> {
    if is_injected(pod) {
        let text = annotations(pod)?.get(CONFIG_ANNOTATION)?.as_str()?;
        let config: Value = serde_yaml::from_str(text).ok()?;
        let upstream = config
            .get("upstream")?
            .as_str()?
            .parse::<http::Uri>()
            .ok()?;
        return upstream.port_u16();
    }
    let options = with_overrides(options, annotations(pod)).ok()?;
    let containers = sequence(pod.get("spec"), "containers");
    options.app_port.or_else(|| first_port(containers))
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}

/// Every declared port in the pod, with the container that declares it.
fn declared_ports(spec: Option<&Value>) -> Vec<(u16, Option<String>, String)> {
    let mut found = Vec::new();
    for list in ["initContainers", "containers"] {
        for c in sequence(spec, list) {
            let container = c.get("name").and_then(Value::as_str).unwrap_or("?");
            for p in sequence(Some(c), "ports") {
                if let Some(n) = port_number(p) {
                    let name = p.get("name").and_then(Value::as_str).map(str::to_string);
                    found.push((n, name, container.to_string()));
                }
            }
        }
    }
    found
}

fn check_ports(
    spec: Option<&Value>,
    options: &InjectOptions,
    app_port: u16,
) -> Result<(), InjectError> {
    let declared = declared_ports(spec);
    for (port, role) in [(options.proxy_port, "proxy"), (options.admin_port, "admin")] {
        if port == app_port {
            return Err(InjectError::PortTaken {
                port,
                role,
                owner: "the app listens on it".into(),
            });
        }
        if let Some((_, _, container)) = declared.iter().find(|(p, _, _)| *p == port) {
            return Err(InjectError::PortTaken {
                port,
                role,
                owner: format!("container {container:?} declares it"),
            });
        }
    }
    if options.proxy_port == options.admin_port {
        return Err(InjectError::PortTaken {
            port: options.admin_port,
            role: "admin",
            owner: "the proxy listens on it".into(),
        });
    }
    Ok(())
}

fn check_names(spec: Option<&Value>) -> Result<(), InjectError> {
    for v in sequence(spec, "volumes") {
        if let Some(name) = v.get("name").and_then(Value::as_str) {
            // The pod may bring its own spool volume (a PVC, an `ephemeral` volume).
            if name != SPOOL_VOLUME && VOLUME_NAMES.contains(&name) {
                return Err(InjectError::NameTaken {
                    what: "volume",
                    name: name.into(),
                });
            }
        }
    }
    for (_, name, _) in declared_ports(spec) {
        if let Some(name) = name.filter(|n| n == ADMIN_PORT_NAME || n == PROXY_PORT_NAME) {
            return Err(InjectError::NameTaken { what: "port", name });
        }
    }
    Ok(())
}

/// The app's declared port: it gives its name to the proxy, so Services that target the port
/// by name reach the proxy instead of the app.
#[derive(Debug, Clone)]
struct Handover {
    container: usize,
    port: usize,
    name: Option<String>,
}

fn find_app_port(containers: &[Value], app_port: u16) -> Option<Handover> {
    containers.iter().enumerate().find_map(|(ci, c)| {
        sequence(Some(c), "ports")
            .iter()
            .position(|p| port_number(p) == Some(app_port))
            .map(|pi| Handover {
                container: ci,
                port: pi,
                name: sequence(Some(c), "ports")[pi]
                    .get("name")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            })
    })
}

fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn annotation_ops(pod: &Value, sidecar: &Sidecar, prefix: &str) -> Vec<Op> {
    let mut wanted = vec![(INJECTED_ANNOTATION, "true".to_string())];
    let existing = annotations(pod);
    if !existing.is_some_and(|a| a.contains_key(CONFIG_ANNOTATION)) {
        wanted.push((CONFIG_ANNOTATION, sidecar.config_text()));
    }
    let as_mapping = |pairs: &[(&str, String)]| {
        Value::Mapping(
            pairs
                .iter()
                .map(|(k, v)| (Value::from(*k), Value::from(v.as_str())))
                .collect(),
        )
    };
    match (pod.get("metadata").filter(|m| m.is_mapping()), existing) {
        (None, _) => {
            let mut metadata = Mapping::new();
            metadata.insert("annotations".into(), as_mapping(&wanted));
            vec![Op::add(format!("{prefix}/metadata"), metadata.into())]
        }
        (Some(_), None) => vec![Op::add(
            format!("{prefix}/metadata/annotations"),
            as_mapping(&wanted),
        )],
        (Some(_), Some(_)) => wanted
            .into_iter()
            .map(|(k, v)| {
                Op::add(
                    format!("{prefix}/metadata/annotations/{}", escape(k)),
                    v.into(),
                )
            })
            .collect(),
    }
}

fn init_container_op(
    spec: Option<&Value>,
    sidecar: &Sidecar,
    prefix: &str,
) -> Result<Op, InjectError> {
    let container = sidecar.container().map_err(|_| InjectError::NoPodSpec)?;
    // First, so the proxy is up (startup probe passed) before any later init container and
    // before the app.
    Ok(match spec.and_then(|s| s.get("initContainers")) {
        Some(Value::Sequence(_)) => Op::add(format!("{prefix}/spec/initContainers/0"), container),
        _ => Op::add(
            format!("{prefix}/spec/initContainers"),
            Value::Sequence(vec![container]),
        ),
    })
}

/// Drops the name from the app's port and rewrites probes and hooks that used that name: a
/// probe resolves a named port against its own container, where the name no longer exists.
fn handover_ops(containers: &[Value], h: &Handover, app_port: u16, prefix: &str) -> Vec<Op> {
    let Some(name) = &h.name else {
        return Vec::new();
    };
    let mut ops = Vec::new();
    let port_path = format!("{prefix}/spec/containers/{}/ports/{}", h.container, h.port);
    if let Some(Value::Mapping(port)) = sequence(containers.get(h.container), "ports").get(h.port) {
        let mut unnamed = port.clone();
        unnamed.remove("name");
        ops.push(Op::replace(port_path, unnamed.into()));
    }
    let handlers = [
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "lifecycle/postStart",
        "lifecycle/preStop",
    ];
    for (ci, container) in containers.iter().enumerate() {
        for handler_path in handlers {
            let mut handler = Some(container);
            for part in handler_path.split('/') {
                handler = handler.and_then(|v| v.get(part));
            }
            for kind in ["httpGet", "tcpSocket"] {
                let port = handler
                    .and_then(|h| h.get(kind))
                    .and_then(|k| k.get("port"));
                if port.and_then(Value::as_str) == Some(name.as_str()) {
                    ops.push(Op::replace(
                        format!("{prefix}/spec/containers/{ci}/{handler_path}/{kind}/port"),
                        Value::from(app_port),
                    ));
                }
            }
        }
    }
    ops
}

fn volume_ops(
    spec: Option<&Value>,
    sidecar: &Sidecar,
    prefix: &str,
) -> Result<Vec<Op>, InjectError> {
    let volumes = sidecar.volumes().map_err(|_| InjectError::NoPodSpec)?;
    Ok(match spec.and_then(|s| s.get("volumes")) {
        Some(Value::Sequence(_)) => volumes
            .into_iter()
            .map(|v| Op::add(format!("{prefix}/spec/volumes/-"), v))
            .collect(),
        _ => vec![Op::add(
            format!("{prefix}/spec/volumes"),
            Value::Sequence(volumes),
        )],
    })
}

/// Why an operation could not be applied (a bug in [`plan`] or a document that changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot apply JSON Patch {op} at {path}")]
pub struct ApplyError {
    op: &'static str,
    path: String,
}

/// Applies operations to a YAML document, keeping the order of every mapping.
pub fn apply(doc: &mut Value, ops: &[Op]) -> Result<(), ApplyError> {
    for op in ops {
        apply_one(doc, op).ok_or_else(|| ApplyError {
            op: op.op,
            path: op.path.clone(),
        })?;
    }
    Ok(())
}

fn apply_one(doc: &mut Value, op: &Op) -> Option<()> {
    let tokens: Vec<String> = op
        .path
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    let (last, parents) = tokens.split_last()?;
    let mut target = doc;
    for token in parents {
        target = match target {
            Value::Mapping(m) => m.get_mut(token.as_str())?,
            Value::Sequence(s) => s.get_mut(token.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    let value = op.value.clone();
    match (target, op.op) {
        (Value::Mapping(m), "add") => {
            m.insert(Value::from(last.as_str()), value);
        }
        (Value::Mapping(m), "replace") => *m.get_mut(last.as_str())? = value,
        (Value::Sequence(s), "add") if last == "-" => s.push(value),
        (Value::Sequence(s), "add") => {
            let i = last.parse::<usize>().ok().filter(|i| *i <= s.len())?;
            s.insert(i, value);
        }
        (Value::Sequence(s), "replace") => *s.get_mut(last.parse::<usize>().ok()?)? = value,
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pod(text: &str) -> Value {
        serde_yaml::from_str(text).unwrap()
    }

    const APP: &str = r#"
metadata:
  name: api
  annotations: { team: data }
spec:
  containers:
    - name: api
      image: example/api:1
      ports: [{ name: http, containerPort: 3000 }]
      readinessProbe: { httpGet: { path: /health, port: http } }
"#;

    fn injected(text: &str, options: &InjectOptions) -> Value {
        let mut p = pod(text);
        let ops = plan(&p, options, "").unwrap();
        apply(&mut p, &ops).unwrap();
        p
    }

    #[test]
    fn hands_the_port_name_to_the_proxy_and_rewrites_probes() {
        let p = injected(APP, &InjectOptions::default());
        let app = &p["spec"]["containers"][0];
        assert_eq!(app["ports"][0].get("name"), None);
        assert_eq!(app["ports"][0]["containerPort"], Value::from(3000));
        assert_eq!(app["readinessProbe"]["httpGet"]["port"], Value::from(3000));
        let side = &p["spec"]["initContainers"][0];
        assert_eq!(side["name"], Value::from("portcullis"));
        assert_eq!(side["ports"][0]["name"], Value::from("http"));
        assert_eq!(p["metadata"]["annotations"]["team"], Value::from("data"));
        assert_eq!(p["spec"]["volumes"].as_sequence().unwrap().len(), 4);
        let config = p["metadata"]["annotations"][CONFIG_ANNOTATION]
            .as_str()
            .unwrap();
        assert!(config.contains("upstream: http://127.0.0.1:3000\n"));
    }

    #[test]
    fn second_plan_is_empty() {
        let p = injected(APP, &InjectOptions::default());
        assert!(plan(&p, &InjectOptions::default(), "").unwrap().is_empty());
    }

    #[test]
    fn annotations_override_options() {
        let text = APP.replace(
            "{ team: data }",
            "{ portcullis.dev/app-port: \"3001\", portcullis.dev/policy-configmap: api-policy }",
        );
        let p = injected(&text, &InjectOptions::default());
        let config = p["metadata"]["annotations"][CONFIG_ANNOTATION]
            .as_str()
            .unwrap();
        assert!(config.contains("127.0.0.1:3001"));
        assert_eq!(
            p["spec"]["volumes"][1]["configMap"]["name"],
            Value::from("api-policy")
        );
        // Port 3000 is not the app port any more, so it keeps its name.
        assert_eq!(
            p["spec"]["containers"][0]["ports"][0]["name"],
            Value::from("http")
        );
    }

    #[test]
    fn existing_init_containers_and_volumes_are_kept_after_the_sidecar() {
        let text = format!(
            "{APP}  initContainers: [{{ name: migrate, image: m }}]\n  volumes: [{{ name: data, emptyDir: {{}} }}]\n"
        );
        let p = injected(&text, &InjectOptions::default());
        let inits = p["spec"]["initContainers"].as_sequence().unwrap();
        assert_eq!(inits[0]["name"], Value::from("portcullis"));
        assert_eq!(inits[1]["name"], Value::from("migrate"));
        let volumes = p["spec"]["volumes"].as_sequence().unwrap();
        assert_eq!(volumes.len(), 5);
        assert_eq!(volumes[0]["name"], Value::from("data"));
    }

    #[test]
    fn refuses_what_cannot_work() {
        let no_port = "spec: { containers: [{ name: a, image: a }] }";
        assert_eq!(
            plan(&pod(no_port), &InjectOptions::default(), ""),
            Err(InjectError::NoAppPort)
        );
        let same =
            "spec: { containers: [{ name: a, image: a, ports: [{ containerPort: 8080 }] }] }";
        assert!(matches!(
            plan(&pod(same), &InjectOptions::default(), ""),
            Err(InjectError::PortTaken { port: 8080, .. })
        ));
        let host = "spec: { hostNetwork: true, containers: [{ name: a, image: a, ports: [{ containerPort: 1 }] }] }";
        assert_eq!(
            plan(&pod(host), &InjectOptions::default(), ""),
            Err(InjectError::HostNetwork)
        );
        let bad = APP.replace("{ team: data }", "{ portcullis.dev/app-port: web }");
        assert!(matches!(
            plan(&pod(&bad), &InjectOptions::default(), ""),
            Err(InjectError::BadAnnotation { .. })
        ));
    }

    #[test]
    fn operator_written_config_is_kept() {
        let text = APP.replace(
            "{ team: data }",
            "{ portcullis.dev/config: \"upstream: http://127.0.0.1:3000\\ndeny_status: 401\\n\" }",
        );
        let p = injected(&text, &InjectOptions::default());
        let config = p["metadata"]["annotations"][CONFIG_ANNOTATION]
            .as_str()
            .unwrap();
        assert!(config.contains("deny_status: 401"));
    }

    fn config_of(p: &Value) -> &str {
        p["metadata"]["annotations"][CONFIG_ANNOTATION]
            .as_str()
            .unwrap()
    }

    #[test]
    fn audit_annotations_write_the_audit_block_and_mount_the_tls_secret() {
        let text = APP.replace(
            "{ team: data }",
            "{ portcullis.dev/audit-syslog: \"tls://siem.example.com:6514\", \
               portcullis.dev/audit-tls-secret: siem-tls, portcullis.dev/audit-client-cert: \"true\" }",
        );
        let p = injected(&text, &InjectOptions::default());
        let config = config_of(&p);
        assert!(
            config.contains(
                "audit:\n  syslog:\n    url: \"tls://siem.example.com:6514\"\n    \
                 spool_dir: /var/spool/portcullis/audit\n    spool_max_bytes: 805306368\n    \
                 ca: /etc/portcullis/audit-tls/ca.crt\n    \
                 client_cert: /etc/portcullis/audit-tls/tls.crt\n    \
                 client_key: /etc/portcullis/audit-tls/tls.key\n"
            ),
            "{config}"
        );
        let volumes = p["spec"]["volumes"].as_sequence().unwrap();
        assert_eq!(volumes.len(), 5);
        assert_eq!(volumes[4]["name"], Value::from("portcullis-audit-tls"));
        assert_eq!(volumes[4]["secret"]["secretName"], Value::from("siem-tls"));
        let mounts = p["spec"]["initContainers"][0]["volumeMounts"]
            .as_sequence()
            .unwrap();
        let tls = mounts
            .iter()
            .find(|m| m["name"] == "portcullis-audit-tls")
            .unwrap();
        assert_eq!(tls["mountPath"], Value::from("/etc/portcullis/audit-tls"));
        assert_eq!(tls["readOnly"], Value::from(true));
    }

    #[test]
    fn audit_options_apply_to_every_pod_and_annotations_win() {
        let options = InjectOptions {
            audit_syslog: Some("tcp://siem:601".into()),
            ..InjectOptions::default()
        };
        let p = injected(APP, &options);
        assert!(config_of(&p).contains("url: \"tcp://siem:601\"\n"));
        assert!(!config_of(&p).contains("ca:"));
        assert_eq!(p["spec"]["volumes"].as_sequence().unwrap().len(), 4);
        let text = APP.replace(
            "{ team: data }",
            "{ portcullis.dev/audit-syslog: \"udp://10.0.0.9\" }",
        );
        let p = injected(&text, &options);
        assert!(config_of(&p).contains("url: \"udp://10.0.0.9\"\n"));
    }

    #[test]
    fn audit_settings_that_cannot_work_are_refused() {
        for (annotations, expected) in [
            ("{ portcullis.dev/audit-syslog: \"siem:6514\" }", "not a syslog URL"),
            ("{ portcullis.dev/audit-syslog: \"tls://siem:0\" }", "not a syslog URL"),
            (
                "{ portcullis.dev/audit-syslog: \"tcp://siem\", portcullis.dev/audit-tls-secret: s }",
                "is for a tls:// SIEM",
            ),
            (
                "{ portcullis.dev/audit-syslog: \"tls://siem\", portcullis.dev/audit-client-cert: \"true\" }",
                "name it with portcullis.dev/audit-tls-secret",
            ),
            ("{ portcullis.dev/audit-client-cert: \"yes\" }", "\"true\" or \"false\""),
            ("{ portcullis.dev/audit-tls-secret: Siem_TLS }", "Secret name"),
            (
                "{ portcullis.dev/config: \"upstream: http://127.0.0.1:3000\\naudit: { syslog: { url: \\\"tcp://s:1\\\" } }\\n\" }",
                "spool_dir: /var/spool/portcullis/audit",
            ),
            (
                "{ portcullis.dev/config: \"upstream: http://127.0.0.1:3000\\naudit: { file: audit.jsonl }\\n\" }",
                "read-only config mount",
            ),
            (
                "{ portcullis.dev/config: \"upstream: http://127.0.0.1:3000\\n\", portcullis.dev/audit-syslog: \"tcp://s:1\" }",
                "brings its own portcullis.dev/config",
            ),
        ] {
            let text = APP.replace("{ team: data }", annotations);
            let e = plan(&pod(&text), &InjectOptions::default(), "").unwrap_err();
            assert!(e.to_string().contains(expected), "{annotations}: {e}");
        }
        let bad_flag = InjectOptions {
            audit_syslog: Some("https://siem".into()),
            ..InjectOptions::default()
        };
        let e = bad_flag.validate().unwrap_err().to_string();
        assert!(e.starts_with("--audit-syslog: \"https://siem\""), "{e}");
    }

    #[test]
    fn a_written_config_with_a_spool_on_the_spool_volume_is_kept() {
        let text = APP.replace(
            "{ team: data }",
            "{ portcullis.dev/config: \"upstream: http://127.0.0.1:3000\\naudit: { file: \\\"-\\\", syslog: { url: \\\"tcp://s:1\\\", spool_dir: /var/spool/portcullis/audit } }\\n\" }",
        );
        let p = injected(&text, &InjectOptions::default());
        assert!(config_of(&p).contains("spool_dir: /var/spool/portcullis/audit"));
    }

    #[test]
    fn a_pod_may_bring_its_own_spool_volume() {
        let text = format!(
            "{APP}  volumes: [{{ name: portcullis-spool, persistentVolumeClaim: {{ claimName: spool }} }}]\n"
        );
        let p = injected(&text, &InjectOptions::default());
        let volumes = p["spec"]["volumes"].as_sequence().unwrap();
        let spools: Vec<&Value> = volumes
            .iter()
            .filter(|v| v["name"] == "portcullis-spool")
            .collect();
        assert_eq!(spools.len(), 1);
        assert!(spools[0].get("persistentVolumeClaim").is_some());
        // A StatefulSet's claim template of that name provides it too.
        let p = pod(APP);
        let ops = plan_pod(&p, &InjectOptions::default(), "", true).unwrap();
        let mut p = p;
        apply(&mut p, &ops).unwrap();
        assert!(p["spec"]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .all(|v| v["name"] != "portcullis-spool"));
    }

    #[test]
    fn app_port_of_injected_and_uninjected_pods() {
        let p = pod(APP);
        assert_eq!(app_port_of(&p, &InjectOptions::default()), Some(3000));
        let p = injected(APP, &InjectOptions::default());
        assert_eq!(app_port_of(&p, &InjectOptions::default()), Some(3000));
    }

    #[test]
    fn prefix_and_pointer_escaping() {
        let p = pod(APP);
        let ops = plan(&p, &InjectOptions::default(), "/spec/template").unwrap();
        assert!(ops.iter().all(|o| o.path.starts_with("/spec/template/")));
        assert!(ops
            .iter()
            .any(|o| o.path == "/spec/template/metadata/annotations/portcullis.dev~1injected"));
    }
}
