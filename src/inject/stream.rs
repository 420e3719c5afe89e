//! `portcullis inject`: the sidecar added to every workload in a multi-document YAML stream.
//!
//! The stream is cut at `---` lines and only documents that change are re-serialised; every
//! other document (Services, ConfigMaps, already-injected workloads, comments) is copied byte
//! for byte, which is what makes a second run print exactly its input.

use anyhow::Context;
use serde_yaml::Value;

use super::plan::{apply, plan};
use super::{InjectOptions, INJECT_ANNOTATION};

/// Adds the sidecar to every Deployment/StatefulSet/DaemonSet/ReplicaSet/Pod (also inside a
/// `List`) in a multi-document YAML stream; idempotent; other documents pass through unchanged.
/// A pod template annotated `portcullis.dev/inject: "false"` is left alone.
pub fn inject_stream(input: &str, options: &InjectOptions) -> anyhow::Result<String> {
    let mut out = String::with_capacity(input.len() * 2);
    for (index, document) in split_documents(input).into_iter().enumerate() {
        let changed = inject_document(document.body, options)
            .with_context(|| format!("document {} ({})", index + 1, describe(document.body)))?;
        out.push_str(document.marker);
        match changed {
            Some(text) => out.push_str(&text),
            None => out.push_str(document.body),
        }
    }
    Ok(out)
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
fn inject_document(text: &str, options: &InjectOptions) -> anyhow::Result<Option<String>> {
    let mut doc: Value = serde_yaml::from_str(text).context("not valid YAML")?;
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
        let ops = plan(pod, options, &pointer)
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
