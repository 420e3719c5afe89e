//! Injection end to end: real Deployment YAML through `inject_stream`, real AdmissionReview v1
//! JSON through `review` (its JSONPatch applied with the `json-patch` crate), and the webhook
//! server over TLS. Every injected pod is checked the way the API server and kubelet would
//! judge it: names unique, mounts backed by volumes, named ports resolvable, the native sidecar
//! in place and its generated `portcullis.yaml` loadable and pointing at the mounted files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis::inject::{inject_stream, pod_patch, review, serve, InjectOptions};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap()
}

/// Every YAML document of a stream as JSON.
fn documents(stream: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(stream)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn strs<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Checks a pod (or pod template) the way the API server and the kubelet would, plus what
/// injection promises. Returns the app port the sidecar forwards to.
fn assert_valid_injected_pod(pod: &Value, options: &InjectOptions) -> u16 {
    let spec = &pod["spec"];
    let inits = strs(spec, "/initContainers");
    let mains = strs(spec, "/containers");
    let all: Vec<&Value> = inits.iter().chain(mains).collect();

    let mut names = HashSet::new();
    for c in &all {
        assert!(
            names.insert(c["name"].as_str().unwrap()),
            "duplicate container {}",
            c["name"]
        );
    }
    let volumes: HashSet<&str> = strs(spec, "/volumes")
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        volumes.len(),
        strs(spec, "/volumes").len(),
        "duplicate volume names"
    );
    let mut port_numbers = HashSet::new();
    let mut port_names = HashSet::new();
    for c in &all {
        for m in strs(c, "/volumeMounts") {
            let name = m["name"].as_str().unwrap();
            assert!(volumes.contains(name), "mount {name} has no volume");
        }
        let own: Vec<&str> = strs(c, "/ports")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        for p in strs(c, "/ports") {
            let n = p["containerPort"].as_u64().unwrap();
            assert!(port_numbers.insert(n), "port {n} declared twice");
            if let Some(name) = p["name"].as_str() {
                assert!(name.len() <= 15, "port name {name} too long");
                assert!(port_names.insert(name), "port name {name} used twice");
            }
        }
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            for kind in ["httpGet", "tcpSocket"] {
                if let Some(name) = c[probe][kind]["port"].as_str() {
                    assert!(
                        own.contains(&name),
                        "{probe} of {} names port {name} it lacks",
                        c["name"]
                    );
                }
            }
        }
    }

    let sidecar = &inits[0];
    assert_eq!(sidecar["name"], "portcullis");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["image"], options.image.as_str());
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            sidecar[probe]["httpGet"]["port"], options.admin_port,
            "{probe}"
        );
    }
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
    let security = &sidecar["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert!(sidecar["resources"]["requests"]["memory"].is_string());
    assert!(sidecar["resources"]["limits"]["memory"].is_string());
    for m in strs(sidecar, "/volumeMounts") {
        assert!(
            m.get("subPath").is_none(),
            "subPath blocks ConfigMap/Secret updates"
        );
    }
    let sidecar_ports: Vec<u64> = strs(sidecar, "/ports")
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(
        sidecar_ports,
        vec![u64::from(options.proxy_port), u64::from(options.admin_port)]
    );

    // The generated config: mounted through the downward API, loadable, and pointing at the
    // files inside the ConfigMap and Secret mounts.
    let volume = |name: &str| {
        strs(spec, "/volumes")
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };
    let mount = |name: &str| {
        strs(sidecar, "/volumeMounts")
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no mount {name}"))["mountPath"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let field = volume("portcullis-config")["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(field, "metadata.annotations['portcullis.dev/config']");
    assert_eq!(
        pod["metadata"]["annotations"]["portcullis.dev/injected"],
        "true"
    );
    let text = pod["metadata"]["annotations"]["portcullis.dev/config"]
        .as_str()
        .unwrap();
    let config_dir = mount("portcullis-config");
    assert_eq!(
        sidecar["args"],
        json!(["run", "-c", format!("{config_dir}/portcullis.yaml")])
    );
    // Everything but the spool is mounted read-only.
    for m in strs(sidecar, "/volumeMounts") {
        let writable = m["name"] == "portcullis-spool";
        assert_eq!(
            m["readOnly"].as_bool().unwrap_or(false),
            !writable,
            "{m} must be {}",
            if writable { "writable" } else { "read-only" }
        );
    }
    // The audit TLS files exist only inside the pod: load the config against real ones.
    let tls_files = tempfile::tempdir().unwrap();
    let has_audit_tls = strs(sidecar, "/volumeMounts")
        .iter()
        .any(|m| m["name"] == "portcullis-audit-tls");
    let loadable = if has_audit_tls {
        write_audit_tls_files(tls_files.path());
        text.replace(
            &mount("portcullis-audit-tls"),
            tls_files.path().to_str().unwrap(),
        )
    } else {
        text.to_string()
    };
    let config = portcullis::config::Config::parse(&loadable, Path::new(&config_dir)).unwrap();
    match (&config.audit, &options.audit_syslog) {
        (None, None) => {}
        (Some(audit), Some(url)) => {
            let syslog = audit.syslog.as_ref().unwrap();
            assert_eq!(&syslog.url, url);
            let spool = syslog.spool_dir.as_ref().unwrap();
            assert!(
                spool.starts_with(mount("portcullis-spool")),
                "the spool is on the writable spool volume: {spool:?}"
            );
            match &options.audit_tls_secret {
                Some(secret) => {
                    assert_eq!(
                        volume("portcullis-audit-tls")["secret"]["secretName"],
                        *secret
                    );
                    let ca = syslog.ca.as_ref().unwrap();
                    assert!(ca.starts_with(tls_files.path()), "{ca:?}");
                    assert_eq!(
                        syslog.client_cert.is_some() && syslog.client_key.is_some(),
                        options.audit_client_cert
                    );
                }
                None => assert!(!has_audit_tls && syslog.ca.is_none()),
            }
        }
        (audit, url) => panic!("audit block {audit:?} for --audit-syslog {url:?}"),
    }
    assert_eq!(config.listen.port(), options.proxy_port);
    assert_eq!(config.admin.port(), options.admin_port);
    assert!(config.policy.starts_with(mount("portcullis-policy")));
    // Keys in a file come from the keys Secret; a PostgreSQL store needs no such volume.
    if let Some(keys) = config.keys.file() {
        assert!(keys.starts_with(mount("portcullis-keys")));
        assert_eq!(
            volume("portcullis-keys")["secret"]["secretName"],
            options.secret.as_str()
        );
    }
    assert_eq!(
        volume("portcullis-policy")["configMap"]["name"],
        options.config_map.as_str()
    );
    assert!(volume("portcullis-spool")["emptyDir"].is_object());
    assert_eq!(config.upstream.host(), Some("127.0.0.1"));
    config.upstream.port_u16().unwrap()
}

/// What a SIEM TLS Secret holds, in cert-manager's layout: `ca.crt`, `tls.crt`, `tls.key`.
fn write_audit_tls_files(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let client = rcgen::CertificateParams::new(vec!["portcullis.test".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.join("tls.crt"), client.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
}

fn pod_template(doc: &Value) -> &Value {
    &doc["spec"]["template"]
}

#[test]
fn example_deployment_gets_a_valid_native_sidecar() {
    let options = InjectOptions::default();
    let out = inject_stream(
        &read("deploy/kubernetes/uninjected/datasets-api.yaml"),
        &options,
    )
    .unwrap();
    let docs = documents(&out);
    assert_eq!(docs.len(), 1);
    let pod = pod_template(&docs[0]);
    assert_eq!(assert_valid_injected_pod(pod, &options), 3000);
    let app = &pod["spec"]["containers"][0];
    assert_eq!(app["ports"][0], json!({ "containerPort": 3000 }));
    assert_eq!(app["readinessProbe"]["httpGet"]["port"], 3000);
    assert_eq!(pod["spec"]["initContainers"][0]["ports"][0]["name"], "http");
}

#[test]
fn second_inject_run_is_byte_identical() {
    let options = InjectOptions::default();
    let once = inject_stream(
        &read("deploy/kubernetes/uninjected/datasets-api.yaml"),
        &options,
    )
    .unwrap();
    let twice = inject_stream(&once, &options).unwrap();
    assert_eq!(once, twice);
}

/// The hand-written example is what the injector makes of the uninjected app.
#[test]
fn committed_example_matches_the_injector() {
    let out = inject_stream(
        &read("deploy/kubernetes/uninjected/datasets-api.yaml"),
        &InjectOptions::default(),
    )
    .unwrap();
    let committed = documents(&read("deploy/kubernetes/example/deployment.yaml"));
    assert_eq!(committed, documents(&out));
}

const MIXED: &str = r#"apiVersion: v1
kind: Service
metadata: { name: ledger }
spec: { ports: [{ port: 80, targetPort: api }], selector: { app: ledger } }
---
apiVersion: apps/v1
kind: StatefulSet
metadata: { name: ledger }
spec:
  serviceName: ledger
  selector: { matchLabels: { app: ledger } }
  template:
    metadata: { labels: { app: ledger }, annotations: { prometheus.io/scrape: "true" } }
    spec:
      initContainers: [{ name: migrate, image: "example/ledger:1", args: [migrate] }]
      containers:
        - name: ledger
          image: example/ledger:1
          ports: [{ name: api, containerPort: 5000 }, { name: grpc, containerPort: 5001 }]
          livenessProbe: { tcpSocket: { port: api } }
          lifecycle: { preStop: { httpGet: { path: /drain, port: api } } }
          volumeMounts: [{ name: data, mountPath: /data }]
      volumes: [{ name: data, emptyDir: {} }]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: { name: node-api }
spec:
  selector: { matchLabels: { app: node-api } }
  template:
    metadata: { labels: { app: node-api } }
    spec:
      containers: [{ name: api, image: "example/node-api:1", ports: [{ containerPort: 7000 }] }]
---
apiVersion: v1
kind: Pod
metadata: { name: scratch, annotations: { portcullis.dev/app-port: "9000" } }
spec:
  containers: [{ name: api, image: "example/api:1" }]
---
apiVersion: v1
kind: ConfigMap
metadata: { name: untouched }
data: { a: b }
"#;

#[test]
fn every_workload_kind_in_a_stream() {
    let options = InjectOptions {
        image: "registry.example/portcullis:9.9".into(),
        proxy_port: 18080,
        admin_port: 19901,
        config_map: "ledger-policy".into(),
        secret: "ledger-keys".into(),
        ..InjectOptions::default()
    };
    let out = inject_stream(MIXED, &options).unwrap();
    let docs = documents(&out);
    assert_eq!(docs.len(), 5);
    assert_eq!(docs[0], documents(MIXED)[0], "the Service passes through");
    assert_eq!(docs[4], documents(MIXED)[4], "the ConfigMap passes through");

    let ledger = pod_template(&docs[1]);
    assert_eq!(assert_valid_injected_pod(ledger, &options), 5000);
    assert_eq!(ledger["spec"]["initContainers"][1]["name"], "migrate");
    assert_eq!(
        ledger["spec"]["initContainers"][0]["ports"][0]["name"],
        "api"
    );
    let app = &ledger["spec"]["containers"][0];
    assert_eq!(app["livenessProbe"]["tcpSocket"]["port"], 5000);
    assert_eq!(app["lifecycle"]["preStop"]["httpGet"]["port"], 5000);
    assert_eq!(
        app["ports"][1]["name"], "grpc",
        "other ports keep their names"
    );
    assert_eq!(
        ledger["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );

    assert_eq!(
        assert_valid_injected_pod(pod_template(&docs[2]), &options),
        7000
    );
    assert_eq!(
        pod_template(&docs[2])["spec"]["initContainers"][0]["ports"][0]["name"],
        "pcs-proxy"
    );
    assert_eq!(assert_valid_injected_pod(&docs[3], &options), 9000);

    assert_eq!(inject_stream(&out, &options).unwrap(), out);
}

#[test]
fn inject_refuses_what_cannot_work_and_says_where() {
    let clash = read("deploy/kubernetes/uninjected/datasets-api.yaml")
        .replace("containerPort: 3000", "containerPort: 8080");
    let e = inject_stream(&clash, &InjectOptions::default()).unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("Deployment/datasets-api"), "{text}");
    assert!(text.contains("8080"), "{text}");
}

/// A pod as the API server sends it to a mutating webhook: created by a ReplicaSet, with the
/// service account token volume the ServiceAccount admission plugin has already added.
fn admission_review(annotations: Value) -> Value {
    json!({
      "apiVersion": "admission.k8s.io/v1",
      "kind": "AdmissionReview",
      "request": {
        "uid": "0df28fbd-5f5f-11e8-bc74-36e6bb280816",
        "kind": { "group": "", "version": "v1", "kind": "Pod" },
        "resource": { "group": "", "version": "v1", "resource": "pods" },
        "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
        "requestResource": { "group": "", "version": "v1", "resource": "pods" },
        "namespace": "shop",
        "operation": "CREATE",
        "userInfo": {
          "username": "system:serviceaccount:kube-system:replicaset-controller",
          "uid": "a7e0ab33-5f29-11e8-a3c6-42010a800002",
          "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
        },
        "object": {
          "kind": "Pod",
          "apiVersion": "v1",
          "metadata": {
            "generateName": "orders-api-7c9f8b6d5-",
            "namespace": "shop",
            "labels": { "app": "orders-api", "pod-template-hash": "7c9f8b6d5" },
            "annotations": annotations,
            "ownerReferences": [{
              "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "orders-api-7c9f8b6d5",
              "uid": "2b0a9d0e-8f1e-4c55-9d7e-3f1f5d2c1a00", "controller": true, "blockOwnerDeletion": true
            }]
          },
          "spec": {
            "volumes": [{
              "name": "kube-api-access-x7k2p",
              "projected": { "defaultMode": 420, "sources": [
                { "serviceAccountToken": { "expirationSeconds": 3607, "path": "token" } },
                { "configMap": { "name": "kube-root-ca.crt", "items": [{ "key": "ca.crt", "path": "ca.crt" }] } }
              ] }
            }],
            "containers": [{
              "name": "orders",
              "image": "example/orders:2.4.1",
              "ports": [{ "name": "http", "containerPort": 3000, "protocol": "TCP" }],
              "readinessProbe": { "httpGet": { "path": "/ready", "port": "http", "scheme": "HTTP" },
                                  "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3 },
              "resources": {},
              "volumeMounts": [{ "name": "kube-api-access-x7k2p", "readOnly": true,
                                 "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount" }],
              "terminationMessagePath": "/dev/termination-log",
              "terminationMessagePolicy": "File",
              "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
          },
          "status": {}
        },
        "oldObject": null,
        "dryRun": false,
        "options": { "kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1" }
      }
    })
}

fn decoded_patch(response: &Value) -> Vec<Value> {
    let text = response["response"]["patch"].as_str().expect("a patch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn apply(doc: &Value, ops: &[Value]) -> Value {
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops.to_vec())).unwrap();
    let mut doc = doc.clone();
    json_patch::patch(&mut doc, &patch).unwrap();
    doc
}

#[test]
fn admission_review_patch_applies_and_yields_a_valid_pod() {
    let options = InjectOptions::default();
    let request = admission_review(json!({ "portcullis.dev/inject": "true" }));
    let response = review(&request, &options);
    assert_eq!(response["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(response["kind"], "AdmissionReview");
    assert_eq!(response["response"]["uid"], request["request"]["uid"]);
    assert_eq!(response["response"]["allowed"], true);
    assert_eq!(response["response"]["patchType"], "JSONPatch");

    let pod = apply(&request["request"]["object"], &decoded_patch(&response));
    assert_eq!(assert_valid_injected_pod(&pod, &options), 3000);
    let volumes: Vec<&str> = strs(&pod, "/spec/volumes")
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        volumes[0], "kube-api-access-x7k2p",
        "existing volumes stay first"
    );
    assert_eq!(
        pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"],
        3000
    );

    // The webhook and `portcullis inject` make the same pod.
    let as_yaml = serde_yaml::to_string(&request["request"]["object"]).unwrap();
    let by_cli = documents(&inject_stream(&as_yaml, &options).unwrap()).remove(0);
    assert_eq!(by_cli, pod);

    // A second review of the injected pod (reinvocation) changes nothing.
    let mut again = request.clone();
    again["request"]["object"] = pod;
    let second = review(&again, &options);
    assert_eq!(second["response"]["allowed"], true);
    assert!(second["response"].get("patch").is_none(), "{second}");
}

#[test]
fn pods_without_the_annotation_are_admitted_unchanged() {
    for annotations in [json!({}), json!({ "portcullis.dev/inject": "false" })] {
        let response = review(&admission_review(annotations), &InjectOptions::default());
        assert_eq!(response["response"]["allowed"], true);
        assert!(response["response"].get("patch").is_none());
    }
}

#[test]
fn a_pod_that_asked_but_cannot_be_injected_is_refused_with_the_reason() {
    let mut request = admission_review(json!({ "portcullis.dev/inject": "true" }));
    request["request"]["object"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
        json!(8080);
    let response = review(&request, &InjectOptions::default());
    assert_eq!(response["response"]["allowed"], false);
    let message = response["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("8080"), "{message}");
}

#[test]
fn pod_patch_with_a_prefix_applies_to_the_whole_deployment() {
    let options = InjectOptions::default();
    let deployment = documents(&read("deploy/kubernetes/uninjected/datasets-api.yaml")).remove(0);
    let ops = pod_patch(pod_template(&deployment), &options, "/spec/template");
    assert!(ops
        .iter()
        .all(|op| op["path"].as_str().unwrap().starts_with("/spec/template/")));
    let patched = apply(&deployment, &ops);
    assert_valid_injected_pod(pod_template(&patched), &options);
    assert!(pod_patch(pod_template(&patched), &options, "/spec/template").is_empty());
}

// ---- the webhook server ----

struct Tls {
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

fn write_cert(dir: &Path) -> Tls {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    // Replace by rename, as the kubelet's atomic writer does.
    std::fs::write(dir.join("tls.key.new"), made.key_pair.serialize_pem()).unwrap();
    std::fs::write(dir.join("tls.crt.new"), made.cert.pem()).unwrap();
    std::fs::rename(dir.join("tls.key.new"), &key).unwrap();
    std::fs::rename(dir.join("tls.crt.new"), &cert).unwrap();
    Tls {
        cert,
        key,
        der: made.cert.der().to_vec(),
    }
}

/// One HTTPS request trusting exactly `trusted`; returns status, body and the server's cert.
async fn call(
    addr: std::net::SocketAddr,
    trusted: &[u8],
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (u16, Value, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(trusted.to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, json, served)
}

/// The served certificate, once a fresh handshake works with `trusted`.
async fn served_with(addr: std::net::SocketAddr, trusted: &[u8]) -> Option<Vec<u8>> {
    let attempt = tokio::spawn({
        let trusted = trusted.to_vec();
        async move { call(addr, &trusted, "GET", "/healthz", Vec::new()).await.2 }
    });
    attempt.await.ok()
}

#[tokio::test]
async fn webhook_serves_reviews_over_tls_and_reloads_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_cert(dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let (cert, key) = (first.cert.clone(), first.key.clone());
        async move {
            serve(listener, &cert, &key, InjectOptions::default(), async {
                let _ = stopped.await;
            })
            .await
        }
    });

    let (status, _, served) = call(addr, &first.der, "GET", "/healthz", Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(served, first.der);

    let request = admission_review(json!({ "portcullis.dev/inject": "true" }));
    let body = serde_json::to_vec(&request).unwrap();
    let (status, answer, _) = call(addr, &first.der, "POST", "/mutate", body).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["uid"], request["request"]["uid"]);
    let pod = apply(&request["request"]["object"], &decoded_patch(&answer));
    assert_valid_injected_pod(&pod, &InjectOptions::default());

    let (status, _, _) = call(addr, &first.der, "POST", "/mutate", b"not json".to_vec()).await;
    assert_eq!(status, 400);

    // cert-manager renews the certificate in place: new handshakes get the new one.
    let second = write_cert(dir.path());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if served_with(addr, &second.der).await.as_deref() == Some(second.der.as_slice()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("the injector stops")
        .unwrap()
        .unwrap();
}

#[test]
fn the_store_overlay_patches_the_example_into_a_valid_pod_with_keys_in_postgres() {
    let kustomization = documents(&read("deploy/kubernetes/store/kustomization.yaml"))
        .pop()
        .unwrap();
    let patch_text = kustomization["patches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["target"]["kind"] == "Deployment")
        .unwrap()["patch"]
        .as_str()
        .unwrap()
        .to_string();
    let ops = documents(&patch_text).pop().unwrap();
    let deployment = documents(&read("deploy/kubernetes/example/deployment.yaml"))
        .pop()
        .unwrap();
    let patched = apply(&deployment, ops.as_array().unwrap());
    let template = pod_template(&patched);
    assert_valid_injected_pod(template, &InjectOptions::default());
    let config_text = template["metadata"]["annotations"]["portcullis.dev/config"]
        .as_str()
        .unwrap();
    let config = portcullis::config::Config::parse(config_text, Path::new("/")).unwrap();
    assert!(
        matches!(config.keys, portcullis::store::KeysLocation::Postgres(_)),
        "{:?}",
        config.keys
    );
    assert!(
        !config_text.contains("replace-me"),
        "no password in the config"
    );
    let sidecar = &template["spec"]["initContainers"][0];
    assert_eq!(sidecar["env"][0]["name"], "PGPASSWORD");
    assert_eq!(
        sidecar["env"][0]["valueFrom"]["secretKeyRef"]["name"],
        "portcullis-db"
    );
    let mounts: Vec<&str> = strs(sidecar, "/volumeMounts")
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(mounts.contains(&"/etc/portcullis/db"), "{mounts:?}");
    assert!(!mounts.contains(&"/etc/portcullis/keys"), "{mounts:?}");
    let cache = config.key_cache.unwrap();
    assert!(
        cache.starts_with("/var/spool/portcullis"),
        "the key cache is on the writable spool volume: {cache:?}"
    );
    let volumes: Vec<&str> = strs(&template["spec"], "/volumes")
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(!volumes.contains(&"portcullis-keys"), "{volumes:?}");
}

// ---- audit to the SIEM, and the binary's messages ----

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args` and `stdin`, waiting at most 20 s.
fn run(args: &[&str], stdin: &str) -> Ran {
    use std::io::Write;
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("portcullis {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn audit_options() -> InjectOptions {
    InjectOptions {
        audit_syslog: Some("tls://siem.example.com:6514".into()),
        audit_tls_secret: Some("siem-tls".into()),
        audit_client_cert: true,
        ..InjectOptions::default()
    }
}

#[test]
fn inject_with_audit_flags_configures_the_siem_spool_and_ca_secret() {
    let ran = run(
        &[
            "inject",
            "--audit-syslog",
            "tls://siem.example.com:6514",
            "--audit-tls-secret",
            "siem-tls",
            "--audit-client-cert",
        ],
        &read("deploy/kubernetes/uninjected/datasets-api.yaml"),
    );
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    assert_eq!(ran.stderr, "");
    let docs = documents(&ran.stdout);
    let pod = pod_template(&docs[0]);
    assert_eq!(assert_valid_injected_pod(pod, &audit_options()), 3000);
    let config = pod["metadata"]["annotations"]["portcullis.dev/config"]
        .as_str()
        .unwrap();
    for line in [
        "audit:",
        "  syslog:",
        "    url: \"tls://siem.example.com:6514\"",
        "    spool_dir: /var/spool/portcullis/audit",
        "    spool_max_bytes: 805306368",
        "    ca: /etc/portcullis/audit-tls/ca.crt",
        "    client_cert: /etc/portcullis/audit-tls/tls.crt",
        "    client_key: /etc/portcullis/audit-tls/tls.key",
    ] {
        assert!(config.lines().any(|l| l == line), "{line:?} in\n{config}");
    }
    let sidecar = &pod["spec"]["initContainers"][0];
    assert!(strs(sidecar, "/volumeMounts").contains(&json!({
        "name": "portcullis-audit-tls", "mountPath": "/etc/portcullis/audit-tls", "readOnly": true
    })));
    // Injecting the output again changes nothing.
    let again = run(
        &["inject", "--audit-syslog", "tls://siem.example.com:6514"],
        &ran.stdout,
    );
    assert_eq!(again.stdout, ran.stdout);
}

#[test]
fn audit_annotations_through_the_webhook_make_the_same_pod_as_inject() {
    let annotations = json!({
        "portcullis.dev/inject": "true",
        "portcullis.dev/audit-syslog": "tls://siem.example.com:6514",
        "portcullis.dev/audit-tls-secret": "siem-tls",
        "portcullis.dev/audit-client-cert": "true",
    });
    let request = admission_review(annotations);
    let response = review(&request, &InjectOptions::default());
    assert_eq!(response["response"]["allowed"], true, "{response}");
    let pod = apply(&request["request"]["object"], &decoded_patch(&response));
    assert_valid_injected_pod(&pod, &audit_options());
    let as_yaml = serde_yaml::to_string(&request["request"]["object"]).unwrap();
    let by_cli = documents(&inject_stream(&as_yaml, &InjectOptions::default()).unwrap()).remove(0);
    assert_eq!(by_cli, pod);
}

#[test]
fn a_written_config_whose_spool_lands_on_the_read_only_mount_is_refused() {
    let input = read("deploy/kubernetes/uninjected/datasets-api.yaml").replace(
        "    metadata:\n      labels:\n        app.kubernetes.io/name: datasets-api\n    spec:",
        "    metadata:\n      labels:\n        app.kubernetes.io/name: datasets-api\n      \
         annotations:\n        portcullis.dev/config: |\n          upstream: http://127.0.0.1:3000\n          \
         audit:\n            syslog: { url: \"tls://siem:6514\" }\n    spec:",
    );
    assert!(
        input.contains("portcullis.dev/config"),
        "the fixture changed"
    );
    let ran = run(&["inject"], &input);
    assert_eq!(ran.code, Some(64), "{}", ran.stderr);
    assert!(
        ran.stderr.contains("Deployment/datasets-api"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr
            .contains("set spool_dir: /var/spool/portcullis/audit"),
        "{}",
        ran.stderr
    );
    assert_eq!(ran.stdout, "");
}

#[test]
fn inject_warns_about_a_service_that_targets_the_app_port() {
    let services = "apiVersion: v1\nkind: Service\nmetadata: { name: datasets-direct }\n\
        spec:\n  selector: { app.kubernetes.io/name: datasets-api }\n  \
        ports: [{ name: web, port: 80, targetPort: 3000 }, { port: 3000 }]\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: { name: datasets-api }\n\
        spec:\n  selector: { app.kubernetes.io/name: datasets-api }\n  \
        ports: [{ port: 80, targetPort: http }]\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: { name: elsewhere }\n\
        spec:\n  selector: { app: other }\n  ports: [{ port: 80, targetPort: 3000 }]\n---\n";
    let input = format!(
        "{services}{}",
        read("deploy/kubernetes/uninjected/datasets-api.yaml")
    );
    let ran = run(&["inject"], &input);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    let warnings: Vec<&str> = ran.stderr.lines().collect();
    assert_eq!(warnings.len(), 2, "{}", ran.stderr);
    for (line, port) in warnings.iter().zip([80, 3000]) {
        assert!(
            line.starts_with(&format!(
                "portcullis inject: warning: Service/datasets-direct port {port} has targetPort 3000, \
                 the app's own port in Deployment/datasets-api: its clients bypass the proxy"
            )),
            "{line}"
        );
        assert!(line.contains("targetPort: 8080"), "{line}");
    }
    // The Services pass through unchanged: the warning is all.
    assert!(ran.stdout.starts_with(services), "{}", ran.stdout);
    // Injected output with the same Services warns again: they still bypass the proxy.
    let again = run(&["inject"], &ran.stdout);
    assert_eq!(again.stderr.lines().count(), 2, "{}", again.stderr);
}

#[test]
fn injector_with_a_missing_or_garbage_certificate_exits_64_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let key = dir.path().join("tls.key");
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    for cert in [&missing, &garbage] {
        let ran = run(
            &[
                "injector",
                "--listen",
                "127.0.0.1:0",
                "--cert",
                cert.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
            ],
            "",
        );
        assert_eq!(ran.code, Some(64), "{}", ran.stderr);
        assert_eq!(ran.stdout, "", "nothing is announced");
        assert!(
            ran.stderr.starts_with(&format!(
                "injector: cannot load the serving certificate: {}: ",
                cert.display()
            )),
            "{}",
            ran.stderr
        );
    }
    let ran = run(
        &[
            "injector",
            "--cert",
            "c",
            "--key",
            "k",
            "--audit-syslog",
            "siem:514",
        ],
        "",
    );
    assert_eq!(ran.code, Some(64), "{}", ran.stderr);
    assert!(
        ran.stderr.contains("--audit-syslog: \"siem:514\""),
        "{}",
        ran.stderr
    );
}
