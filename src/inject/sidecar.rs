//! What gets added to a pod: the sidecar container, its volumes and its `portcullis.yaml`.
//!
//! Written as YAML templates so a reader sees the manifest Kubernetes will see. Every string
//! that comes from outside is JSON-quoted before it enters a template (a JSON string is a valid
//! YAML double-quoted scalar), so no option can break out of its field.

use serde_yaml::Value;

use super::{InjectOptions, CONFIG_ANNOTATION, SIDECAR_NAME};

/// Volume names the sidecar adds to the pod.
pub const VOLUME_NAMES: [&str; 4] = [
    "portcullis-config",
    "portcullis-policy",
    "portcullis-keys",
    "portcullis-spool",
];
/// Port name of the admin listener.
pub const ADMIN_PORT_NAME: &str = "pcs-admin";
/// Port name of the proxy when the app's port had none to hand over.
pub const PROXY_PORT_NAME: &str = "pcs-proxy";
/// Where the generated config is mounted.
pub const CONFIG_PATH: &str = "/etc/portcullis/config/portcullis.yaml";
/// Where the audit spool lives (an emptyDir, so the root filesystem stays read-only).
pub const SPOOL_DIR: &str = "/var/spool/portcullis";

/// The resolved settings for one pod.
#[derive(Debug, Clone)]
pub struct Sidecar {
    /// Global options with the pod's annotations applied.
    pub options: InjectOptions,
    /// The app's port on 127.0.0.1.
    pub app_port: u16,
    /// Name for the proxy's container port (taken over from the app's port when it had one).
    pub proxy_port_name: String,
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
             log:\n  format: json\n",
            proxy = self.options.proxy_port,
            app = self.app_port,
            admin = self.options.admin_port,
        )
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
  - {{ name: portcullis-spool, mountPath: {spool} }}
"#,
            name = SIDECAR_NAME,
            image = quote(&o.image),
            config = CONFIG_PATH,
            proxy_name = quote(&self.proxy_port_name),
            proxy = o.proxy_port,
            admin_name = ADMIN_PORT_NAME,
            admin = o.admin_port,
            spool = SPOOL_DIR,
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
- name: portcullis-spool
  emptyDir: {{ sizeLimit: 1Gi }}
"#,
            config_key = CONFIG_ANNOTATION,
            config_map = quote(&self.options.config_map),
            secret = quote(&self.options.secret),
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
