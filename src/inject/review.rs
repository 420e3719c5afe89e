//! The webhook's decision, without a server: AdmissionReview v1 request in, response out.
//!
//! A pod that asks for injection (`portcullis.dev/inject: "true"`) and cannot get it is refused
//! with the reason, rather than admitted without the sidecar: it asked for enforcement in front
//! of its API, and running it unguarded would fail open.

use base64::Engine;
use serde_json::{json, Value};

use super::plan::try_pod_patch;
use super::{InjectOptions, INJECT_ANNOTATION};

/// Pure: AdmissionReview v1 request JSON → AdmissionReview v1 response JSON (uid echoed, allowed
/// true, patchType JSONPatch, base64 patch). Testable without a server.
pub fn review(request: &Value, options: &InjectOptions) -> Value {
    let Some(req) = request.get("request") else {
        return envelope(
            request,
            json!({ "uid": "", "allowed": false,
                    "status": { "code": 400, "message": "AdmissionReview has no request" } }),
        );
    };
    let uid = req.get("uid").cloned().unwrap_or_else(|| json!(""));
    let response = match decide(req, options) {
        Decision::Leave => json!({ "uid": uid, "allowed": true }),
        Decision::Patch(ops) => {
            let patch = serde_json::to_vec(&ops).unwrap_or_default();
            json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch),
            })
        }
        Decision::Refuse(message) => json!({
            "uid": uid,
            "allowed": false,
            "status": { "code": 422, "reason": "Invalid", "message": message },
        }),
    };
    envelope(request, response)
}

enum Decision {
    Leave,
    Patch(Vec<Value>),
    Refuse(String),
}

fn decide(req: &Value, options: &InjectOptions) -> Decision {
    let is_pod = req.pointer("/kind/kind").and_then(Value::as_str) == Some("Pod")
        && req
            .pointer("/kind/group")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty();
    let operation = req.get("operation").and_then(Value::as_str).unwrap_or("");
    let Some(pod) = req
        .get("object")
        .filter(|_| is_pod && operation == "CREATE")
    else {
        return Decision::Leave;
    };
    let wanted = pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .and_then(Value::as_str)
        == Some("true");
    if !wanted {
        return Decision::Leave;
    }
    let name = pod
        .pointer("/metadata/name")
        .or_else(|| pod.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    let namespace = req.get("namespace").and_then(Value::as_str).unwrap_or("?");
    match try_pod_patch(pod, options, "") {
        Ok(ops) if ops.is_empty() => Decision::Leave,
        Ok(ops) => {
            tracing::info!(namespace, pod = name, "injecting portcullis");
            Decision::Patch(ops)
        }
        Err(e) => {
            tracing::warn!(namespace, pod = name, error = %e, "refusing pod that asked for portcullis");
            Decision::Refuse(format!(
                "portcullis injection was requested ({INJECT_ANNOTATION}: \"true\") but is not possible: {e}"
            ))
        }
    }
}

fn envelope(request: &Value, response: Value) -> Value {
    json!({
        "apiVersion": request.get("apiVersion").cloned().unwrap_or_else(|| json!("admission.k8s.io/v1")),
        "kind": "AdmissionReview",
        "response": response,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request(annotations: Value, ports: Value) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "namespace": "shop",
                "operation": "CREATE",
                "object": {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": { "generateName": "api-", "annotations": annotations },
                    "spec": { "containers": [{ "name": "api", "image": "a", "ports": ports }] }
                }
            }
        })
    }

    #[test]
    fn patches_annotated_pods() {
        let r = review(
            &request(
                json!({ "portcullis.dev/inject": "true" }),
                json!([{ "containerPort": 3000 }]),
            ),
            &InjectOptions::default(),
        );
        assert_eq!(r["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(r["response"]["allowed"], true);
        assert_eq!(r["response"]["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["response"]["patch"].as_str().unwrap())
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
        assert!(!ops.is_empty());
    }

    #[test]
    fn leaves_other_pods_alone() {
        let r = review(
            &request(json!({}), json!([{ "containerPort": 3000 }])),
            &InjectOptions::default(),
        );
        assert_eq!(r["response"]["allowed"], true);
        assert!(r["response"].get("patch").is_none());
    }

    #[test]
    fn refuses_pods_that_asked_but_cannot_be_injected() {
        let r = review(
            &request(json!({ "portcullis.dev/inject": "true" }), json!([])),
            &InjectOptions::default(),
        );
        assert_eq!(r["response"]["allowed"], false);
        let message = r["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains("app-port"), "{message}");
    }

    #[test]
    fn malformed_review_is_refused_not_panicked() {
        let r = review(
            &json!({ "kind": "AdmissionReview" }),
            &InjectOptions::default(),
        );
        assert_eq!(r["response"]["allowed"], false);
        assert_eq!(r["apiVersion"], "admission.k8s.io/v1");
    }
}
