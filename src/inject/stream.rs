//! `portcullis inject`: the sidecar added to every workload in a multi-document YAML stream.
//!
//! The stream is cut at `---` lines and only documents that change are re-serialised; every
//! other document (Services, ConfigMaps, already-injected workloads, comments) is copied byte
//! for byte, which is what makes a second run print exactly its input.

use anyhow::Context;
use serde_yaml::Value;

use super::plan::{app_port_of, apply, plan_pod};
use super::sidecar::SPOOL_VOLUME;
use super::{InjectOptions, INJECT_ANNOTATION};

/// Adds the sidecar to every Deployment/StatefulSet/DaemonSet/ReplicaSet/Pod (also inside a
/// `List`) in a multi-document YAML stream; idempotent; other documents pass through unchanged.
/// A pod template annotated `portcullis.dev/inject: "false"` is left alone.
pub fn inject_stream(input: &str, options: &InjectOptions) -> anyhow::Result<String> {
    Ok(inject_stream_with_warnings(input, options)?.output)
}

/// What [`inject_stream_with_warnings`] makes of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// The stream with the sidecar added.
    pub output: String,
    /// Things that work but defeat the proxy, for stderr: a Service in the stream whose
    /// `targetPort` is an injected app's own port sends its clients around the proxy.
    pub warnings: Vec<String>,
}

/// [`inject_stream`], with the warnings about the stream.
pub fn inject_stream_with_warnings(
    input: &str,
    options: &InjectOptions,
) -> anyhow::Result<Injected> {
    let mut out = String::with_capacity(input.len() * 2);
    let mut seen = Seen::default();
    for (index, document) in split_documents(input).into_iter().enumerate() {
        let changed = inject_document(document.body, options, &mut seen)
            .with_context(|| format!("document {} ({})", index + 1, describe(document.body)))?;
        out.push_str(document.marker);
        match changed {
            Some(text) => out.push_str(&text),
            None => out.push_str(document.body),
        }
    }
    Ok(Injected {
        output: out,
        warnings: seen.bypass_warnings(options),
    })
}

/// The Services and guarded pods of a stream, to find Services that bypass the proxy.
#[derive(Debug, Default)]
struct Seen {
    services: Vec<Service>,
    pods: Vec<GuardedPod>,
}

#[derive(Debug)]
struct Service {
    name: String,
    namespace: Option<String>,
    selector: serde_yaml::Mapping,
    /// `(port, targetPort)`; a missing targetPort is the port itself, as Kubernetes defaults it.
    ports: Vec<(u64, Value)>,
}

#[derive(Debug)]
struct GuardedPod {
    /// `Deployment/orders`.
    owner: String,
    namespace: Option<String>,
    labels: serde_yaml::Mapping,
    app_port: u16,
}

impl Seen {
    fn service(&mut self, doc: &Value) {
        let metadata = doc.get("metadata");
        let spec = doc.get("spec");
        let ports = spec
            .and_then(|s| s.get("ports"))
            .and_then(Value::as_sequence)
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(|p| {
                        let port = p.get("port").and_then(Value::as_u64)?;
                        let target = p.get("targetPort").cloned().unwrap_or(Value::from(port));
                        Some((port, target))
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.services.push(Service {
            name: string(metadata, "name").unwrap_or_else(|| "?".into()),
            namespace: string(metadata, "namespace"),
            selector: spec
                .and_then(|s| s.get("selector"))
                .and_then(Value::as_mapping)
                .cloned()
                .unwrap_or_default(),
            ports,
        });
    }

    fn bypass_warnings(&self, options: &InjectOptions) -> Vec<String> {
        let mut warnings = Vec::new();
        for service in &self.services {
            // A Service without a selector has its endpoints managed by hand: nothing to match.
            if service.selector.is_empty() {
                continue;
            }
            for pod in &self.pods {
                let same_namespace = match (&service.namespace, &pod.namespace) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                };
                let selected = service
                    .selector
                    .iter()
                    .all(|(k, v)| pod.labels.get(k) == Some(v));
                if !same_namespace || !selected {
                    continue;
                }
                for (port, target) in &service.ports {
                    if target.as_u64() == Some(u64::from(pod.app_port)) {
                        warnings.push(format!(
                            "Service/{} port {port} has targetPort {}, the app's own port in {}: \
                             its clients bypass the proxy (no key check, no audit). Set \
                             targetPort: {} (the proxy port)",
                            service.name, pod.app_port, pod.owner, options.proxy_port
                        ));
                    }
                }
            }
        }
        warnings
    }
}

fn string(parent: Option<&Value>, field: &str) -> Option<String> {
    parent?.get(field)?.as_str().map(str::to_string)
}

/// Whether the workload at `pointer` (a pod template's owner) is a StatefulSet whose
/// `volumeClaimTemplates` provide the spool volume.
fn has_spool_claim(workload: Option<&Value>) -> bool {
    let Some(workload) = workload else {
        return false;
    };
    workload.get("kind").and_then(Value::as_str) == Some("StatefulSet")
        && workload
            .get("spec")
            .and_then(|s| s.get("volumeClaimTemplates"))
            .and_then(Value::as_sequence)
            .is_some_and(|claims| {
                claims.iter().any(|c| {
                    c.get("metadata")
                        .and_then(|m| m.get("name"))
                        .and_then(Value::as_str)
                        == Some(SPOOL_VOLUME)
                })
            })
}

/// One document: its `---` line (empty for the first document when it has none) and its text.
struct Document<'a> {
    marker: &'a str,
    body: &'a str,
}

fn is_marker(line: &str) -> bool {
    let line = line.trim_end_matches(['\n', '\r']);
    line == "---" || line.starts_with("--- ") || line.starts_with("---\t")
}

fn split_documents(input: &str) -> Vec<Document<'_>> {
    let mut documents = Vec::new();
    let mut marker = "";
    let mut body_start = 0;
    let mut offset = 0;
    for line in input.split_inclusive('\n') {
        if is_marker(line) {
            if offset > 0 || !marker.is_empty() {
                documents.push(Document {
                    marker,
                    body: &input[body_start..offset],
                });
            }
            marker = &input[offset..offset + line.len()];
            body_start = offset + line.len();
        }
        offset += line.len();
    }
    documents.push(Document {
        marker,
        body: &input[body_start..],
    });
    documents
}

/// The re-serialised document when something was injected, `None` when it stays as written.
fn inject_document(
    text: &str,
    options: &InjectOptions,
    seen: &mut Seen,
) -> anyhow::Result<Option<String>> {
    let mut doc: Value = serde_yaml::from_str(text).context("not valid YAML")?;
    for service in services(&doc) {
        seen.service(service);
    }
    let mut changed = false;
    for pointer in pod_pointers(&doc, "") {
        let Some(pod) = pointer_get(&doc, &pointer) else {
            continue;
        };
        let opted_out = pod
            .get("metadata")
            .and_then(|m| m.get("annotations"))
            .and_then(|a| a.get(INJECT_ANNOTATION))
            .and_then(Value::as_str)
            == Some("false");
        if opted_out {
            continue;
        }
        let workload = pointer_get(
            &doc,
            pointer.strip_suffix("/spec/template").unwrap_or(&pointer),
        );
        let metadata = workload.and_then(|w| w.get("metadata"));
        if let Some(app_port) = app_port_of(pod, options) {
            seen.pods.push(GuardedPod {
                owner: format!(
                    "{}/{}",
                    string(workload, "kind").unwrap_or_else(|| "?".into()),
                    string(metadata, "name").unwrap_or_else(|| "?".into())
                ),
                namespace: string(metadata, "namespace"),
                labels: pod
                    .get("metadata")
                    .and_then(|m| m.get("labels"))
                    .and_then(Value::as_mapping)
                    .cloned()
                    .unwrap_or_default(),
                app_port,
            });
        }
        let ops = plan_pod(pod, options, &pointer, has_spool_claim(workload))
            .with_context(|| format!("cannot inject the pod template at {}", display(&pointer)))?;
        apply(&mut doc, &ops)?;
        changed |= !ops.is_empty();
    }
    if !changed {
        return Ok(None);
    }
    Ok(Some(serde_yaml::to_string(&doc)?))
}

/// JSON Pointers to every pod (template) in a document.
fn pod_pointers(doc: &Value, base: &str) -> Vec<String> {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
    match kind {
        "Pod" => vec![base.to_string()],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => {
            vec![format!("{base}/spec/template")]
        }
        "List" => doc
            .get("items")
            .and_then(Value::as_sequence)
            .map(|items| {
                items
                    .iter()
                    .enumerate()
                    .flat_map(|(i, item)| pod_pointers(item, &format!("{base}/items/{i}")))
                    .collect()
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Every Service in a document (also inside a `List`).
fn services(doc: &Value) -> Vec<&Value> {
    match doc.get("kind").and_then(Value::as_str) {
        Some("Service") => vec![doc],
        Some("List") => doc
            .get("items")
            .and_then(Value::as_sequence)
            .map(|items| items.iter().flat_map(services).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn pointer_get<'a>(doc: &'a Value, pointer: &str) -> Option<&'a Value> {
    pointer
        .split('/')
        .skip(1)
        .try_fold(doc, |v, token| match v {
            Value::Sequence(s) => s.get(token.parse::<usize>().ok()?),
            _ => v.get(token),
        })
}

fn display(pointer: &str) -> &str {
    if pointer.is_empty() {
        "the document root"
    } else {
        pointer
    }
}

fn describe(text: &str) -> String {
    let doc: Value = serde_yaml::from_str(text).unwrap_or(Value::Null);
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("?");
    let name = doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    format!("{kind}/{name}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const STREAM: &str = r#"# leading comment
apiVersion: v1
kind: Service   # keep me
metadata: { name: api }
spec: { ports: [{ port: 80, targetPort: http }] }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: api }
spec:
  selector: { matchLabels: { app: api } }
  template:
    metadata: { labels: { app: api } }
    spec:
      containers:
        - name: api
          image: example/api:1
          ports: [{ name: http, containerPort: 3000 }]
--- # trailing
kind: ConfigMap
apiVersion: v1
metadata: { name: other }
"#;

    #[test]
    fn splits_and_reassembles_byte_for_byte() {
        let docs = split_documents(STREAM);
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[2].marker, "--- # trailing\n");
        let joined: String = docs
            .iter()
            .map(|d| format!("{}{}", d.marker, d.body))
            .collect();
        assert_eq!(joined, STREAM);
    }

    #[test]
    fn injects_workloads_and_copies_the_rest() {
        let out = inject_stream(STREAM, &InjectOptions::default()).unwrap();
        assert!(out.starts_with("# leading comment\napiVersion: v1\nkind: Service   # keep me\n"));
        assert!(out.ends_with(
            "--- # trailing\nkind: ConfigMap\napiVersion: v1\nmetadata: { name: other }\n"
        ));
        assert!(out.contains("restartPolicy: Always"));
        let again = inject_stream(&out, &InjectOptions::default()).unwrap();
        assert_eq!(again, out);
    }

    #[test]
    fn opt_out_and_lists() {
        let opted = STREAM.replace(
            "metadata: { labels: { app: api } }",
            "metadata: { labels: { app: api }, annotations: { portcullis.dev/inject: \"false\" } }",
        );
        assert_eq!(
            inject_stream(&opted, &InjectOptions::default()).unwrap(),
            opted
        );
        let list = "kind: List\napiVersion: v1\nitems:\n  - kind: Pod\n    apiVersion: v1\n    metadata: { name: p }\n    spec: { containers: [{ name: a, image: a, ports: [{ containerPort: 5000 }] }] }\n";
        let out = inject_stream(list, &InjectOptions::default()).unwrap();
        assert!(out.contains("upstream: http://127.0.0.1:5000"), "{out}");
    }

    #[test]
    fn errors_name_the_document() {
        let bad =
            "kind: Pod\nmetadata: { name: p }\nspec: { containers: [{ name: a, image: a }] }\n";
        let e = inject_stream(bad, &InjectOptions::default()).unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("document 1 (Pod/p)"), "{text}");
        assert!(text.contains("containerPort"), "{text}");
    }

    #[test]
    fn empty_input_and_documents_pass_through() {
        for input in ["", "---\n", "# only a comment\n", "---\n---\n"] {
            assert_eq!(
                inject_stream(input, &InjectOptions::default()).unwrap(),
                input
            );
        }
    }
}
