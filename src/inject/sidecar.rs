//! What gets added to a pod: the sidecar container, its volumes and its `portcullis.yaml`.
//!
//! Written as YAML templates so a reader sees the manifest Kubernetes will see. Every string
//! that comes from outside is JSON-quoted before it enters a template (a JSON string is a valid
//! YAML double-quoted scalar), so no option can break out of its field.

use serde_yaml::Value;

use super::{InjectOptions, CONFIG_ANNOTATION, SIDECAR_NAME};

/// Volume names the sidecar adds to the pod. A pod may bring its own [`SPOOL_VOLUME`]; the
/// others must not be taken.
pub const VOLUME_NAMES: [&str; 5] = [
    "portcullis-config",
    "portcullis-policy",
    "portcullis-keys",
    SPOOL_VOLUME,
    AUDIT_TLS_VOLUME,
];
/// The writable volume for the audit spool (and a key cache): an `emptyDir` unless the pod
/// declares a volume of this name itself (a PVC, an `ephemeral` volume).
pub const SPOOL_VOLUME: &str = "portcullis-spool";
/// The Secret volume with the SIEM's CA and the client certificate.
pub const AUDIT_TLS_VOLUME: &str = "portcullis-audit-tls";
/// Where that Secret is mounted.
pub const AUDIT_TLS_DIR: &str = "/etc/portcullis/audit-tls";
/// Port name of the admin listener.
pub const ADMIN_PORT_NAME: &str = "pcs-admin";
/// Port name of the proxy when the app's port had none to hand over.
pub const PROXY_PORT_NAME: &str = "pcs-proxy";
/// Where the generated config is mounted.
pub const CONFIG_PATH: &str = "/etc/portcullis/config/portcullis.yaml";
/// Where the spool volume is mounted (so the root filesystem stays read-only).
pub const SPOOL_DIR: &str = "/var/spool/portcullis";
/// `audit.syslog.spool_dir` of the generated config: on the spool volume.
pub const AUDIT_SPOOL_DIR: &str = "/var/spool/portcullis/audit";
/// `audit.syslog.spool_max_bytes` of the generated config: 768 MiB, so a full spool stays
/// below the spool `emptyDir`'s 1Gi `sizeLimit` (past which the kubelet evicts the pod, spool
/// and all) with room for a key cache.
pub const AUDIT_SPOOL_MAX_BYTES: u64 = 768 << 20;

/// The resolved settings for one pod.
#[derive(Debug, Clone)]
pub struct Sidecar {
    /// Global options with the pod's annotations applied.
    pub options: InjectOptions,
    /// The app's port on 127.0.0.1.
    pub app_port: u16,
    /// Name for the proxy's container port (taken over from the app's port when it had one).
    pub proxy_port_name: String,
    /// The pod declares its own [`SPOOL_VOLUME`]; no `emptyDir` is added.
    pub spool_provided: bool,
}

impl Sidecar {
    /// The `portcullis.yaml` the sidecar runs with.
    pub fn config_text(&self) -> String {
        format!(
            "# Written by portcullis inject. Edit the policy ConfigMap and keys Secret, not this.\n\
             listen: 0.0.0.0:{proxy}\n\
             upstream: http://127.0.0.1:{app}\n\
             admin: 0.0.0.0:{admin}\n\
             policy: /etc/portcullis/policy/policy.yaml\n\
             keys: /etc/portcullis/keys/keys.yaml\n\
             {audit}\
             log:\n  format: json\n",
            proxy = self.options.proxy_port,
            app = self.app_port,
            admin = self.options.admin_port,
            audit = self.audit_text(),
        )
    }

    /// The `audit:` block: the syslog stream to the SIEM, spooled on the writable spool volume,
    /// trusting the CA (and sending the client certificate) from the audit TLS Secret.
    fn audit_text(&self) -> String {
        let o = &self.options;
        let Some(url) = &o.audit_syslog else {
            return String::new();
        };
        let mut text = format!(
            "audit:\n  syslog:\n    url: {url}\n    spool_dir: {AUDIT_SPOOL_DIR}\n    \
             spool_max_bytes: {AUDIT_SPOOL_MAX_BYTES}\n",
            url = quote(url)
        );
        if o.audit_tls_secret.is_some() {
            text.push_str(&format!("    ca: {AUDIT_TLS_DIR}/ca.crt\n"));
            if o.audit_client_cert {
                text.push_str(&format!(
                    "    client_cert: {AUDIT_TLS_DIR}/tls.crt\n    client_key: {AUDIT_TLS_DIR}/tls.key\n"
                ));
            }
        }
        text
    }

    /// The native sidecar: an init container that keeps running (`restartPolicy: Always`), so it
    /// is ready before the app starts and stops only after the app has exited.
    pub fn container(&self) -> Result<Value, serde_yaml::Error> {
        let o = &self.options;
        let text = format!(
            r#"
name: {name}
image: {image}
imagePullPolicy: IfNotPresent
restartPolicy: Always
args: [run, -c, {config}]
ports:
  - name: {proxy_name}
    containerPort: {proxy}
    protocol: TCP
  - name: {admin_name}
    containerPort: {admin}
    protocol: TCP
startupProbe:
  httpGet: {{ path: /readyz, port: {admin} }}
  periodSeconds: 1
  failureThreshold: 120
readinessProbe:
  httpGet: {{ path: /readyz, port: {admin} }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  httpGet: {{ path: /healthz, port: {admin} }}
  periodSeconds: 10
  failureThreshold: 3
resources:
  requests: {{ cpu: 50m, memory: 32Mi }}
  limits: {{ cpu: "1", memory: 256Mi }}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{ drop: [ALL] }}
  seccompProfile: {{ type: RuntimeDefault }}
terminationMessagePolicy: FallbackToLogsOnError
volumeMounts:
  - {{ name: portcullis-config, mountPath: /etc/portcullis/config, readOnly: true }}
  - {{ name: portcullis-policy, mountPath: /etc/portcullis/policy, readOnly: true }}
  - {{ name: portcullis-keys, mountPath: /etc/portcullis/keys, readOnly: true }}
  - {{ name: {spool_volume}, mountPath: {spool} }}
{audit_tls_mount}"#,
            name = SIDECAR_NAME,
            image = quote(&o.image),
            config = CONFIG_PATH,
            proxy_name = quote(&self.proxy_port_name),
            proxy = o.proxy_port,
            admin_name = ADMIN_PORT_NAME,
            admin = o.admin_port,
            spool = SPOOL_DIR,
            spool_volume = SPOOL_VOLUME,
            audit_tls_mount = match o.audit_tls_secret {
                Some(_) => format!(
                    "  - {{ name: {AUDIT_TLS_VOLUME}, mountPath: {AUDIT_TLS_DIR}, readOnly: true }}\n"
                ),
                None => String::new(),
            },
        );
        serde_yaml::from_str(&text)
    }

    /// The volumes behind the mounts. ConfigMap and Secret are whole directories (never
    /// `subPath`), so the kubelet's `..data` swap delivers updates and portcullis reloads them.
    pub fn volumes(&self) -> Result<Vec<Value>, serde_yaml::Error> {
        let text = format!(
            r#"
- name: portcullis-config
  downwardAPI:
    items:
      - path: portcullis.yaml
        fieldRef: {{ fieldPath: "metadata.annotations['{config_key}']" }}
- name: portcullis-policy
  configMap: {{ name: {config_map} }}
- name: portcullis-keys
  secret: {{ secretName: {secret} }}
{spool}{audit_tls}"#,
            config_key = CONFIG_ANNOTATION,
            config_map = quote(&self.options.config_map),
            secret = quote(&self.options.secret),
            spool = match self.spool_provided {
                true => String::new(),
                false => format!("- name: {SPOOL_VOLUME}\n  emptyDir: {{ sizeLimit: 1Gi }}\n"),
            },
            audit_tls = match &self.options.audit_tls_secret {
                Some(name) => format!(
                    "- name: {AUDIT_TLS_VOLUME}\n  secret: {{ secretName: {} }}\n",
                    quote(name)
                ),
                None => String::new(),
            },
        );
        serde_yaml::from_str(&text)
    }
}

/// A string as a YAML double-quoted scalar.
fn quote(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Config;

    fn sidecar(options: InjectOptions) -> Sidecar {
        Sidecar {
            options,
            app_port: 3000,
            proxy_port_name: "http".into(),
            spool_provided: false,
        }
    }

    #[test]
    fn generated_config_is_accepted_by_the_config_loader() {
        let s = sidecar(InjectOptions::default());
        let config = Config::parse(&s.config_text(), std::path::Path::new("/x")).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(config.admin.to_string(), "0.0.0.0:9901");
        assert_eq!(config.upstream.to_string(), "http://127.0.0.1:3000/");
        assert_eq!(
            config.policy,
            std::path::PathBuf::from("/etc/portcullis/policy/policy.yaml")
        );
    }

    #[test]
    fn generated_audit_block_is_accepted_and_spools_on_the_spool_volume() {
        let s = sidecar(InjectOptions {
            audit_syslog: Some("tcp://siem.example.com:601".into()),
            ..InjectOptions::default()
        });
        let config = Config::parse(&s.config_text(), std::path::Path::new("/x")).unwrap();
        let syslog = config.audit.unwrap().syslog.unwrap();
        assert_eq!(syslog.url, "tcp://siem.example.com:601");
        let spool = syslog.spool_dir.unwrap();
        assert!(spool.starts_with(SPOOL_DIR), "{spool:?}");
        assert_eq!(syslog.spool_max_bytes, Some(768 << 20));
    }

    #[test]
    fn container_is_a_native_sidecar_with_probes_on_the_admin_port() {
        let c = sidecar(InjectOptions::default()).container().unwrap();
        assert_eq!(c["restartPolicy"], Value::from("Always"));
        assert_eq!(c["ports"][0]["name"], Value::from("http"));
        assert_eq!(c["ports"][0]["containerPort"], Value::from(8080));
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(c[probe]["httpGet"]["port"], Value::from(9901), "{probe}");
        }
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"],
            Value::from(true)
        );
    }

    #[test]
    fn hostile_option_strings_stay_inside_their_field() {
        let options = InjectOptions {
            image: "evil\"\n  privileged: true".into(),
            config_map: "x }\nhostPath: {path: /".into(),
            ..InjectOptions::default()
        };
        let s = sidecar(options.clone());
        let c = s.container().unwrap();
        assert_eq!(c["image"], Value::from(options.image.as_str()));
        assert!(c.get("privileged").is_none());
        let v = s.volumes().unwrap();
        assert_eq!(v[1]["configMap"]["name"], Value::from(options.config_map));
        assert!(v.iter().all(|v| v.get("hostPath").is_none()));
    }
}
