//! TLS through the real binary with certificates generated per test: termination with HTTP/1.1
//! and HTTP/2 by ALPN, a renewed certificate picked up without dropping connections, client
//! certificates (mTLS), and an https upstream that offers HTTP/2.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::*;
use tokio::net::{TcpListener, TcpStream};

/// A throwaway certificate authority.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "portcullis test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf for `localhost`; returns (cert PEM, key PEM).
    fn issue(&self, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

fn roots(ca_pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client connection to the proxy.
struct TlsClient {
    alpn: Option<Vec<u8>>,
    peer_cert: Vec<u8>,
    sender: Sender,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

async fn connect(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[&[u8]],
    identity: Option<&(String, String)>,
) -> Result<TlsClient, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca_pem));
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(|c| c.unwrap())
                    .collect();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(PATIENCE, connector.connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(|p| p.to_vec());
    let peer_cert = session.peer_certificates().unwrap()[0].to_vec();
    let io = TokioIo::new(tls);
    let sender = if alpn.as_deref() == Some(b"h2") {
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Sender::H2(sender)
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Sender::H1(sender)
    };
    Ok(TlsClient {
        alpn,
        peer_cert,
        sender,
    })
}

impl TlsClient {
    async fn get(&mut self, path: &str, key: &TestKey) -> Result<u16, String> {
        let request = Request::get(format!("https://localhost{path}"))
            .header("authorization", format!("Bearer {}", key.key))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = match &mut self.sender {
            Sender::H1(s) => {
                let mut request = request;
                *request.uri_mut() = path.parse().unwrap();
                request
                    .headers_mut()
                    .insert("host", "localhost".parse().unwrap());
                s.send_request(request).await
            }
            Sender::H2(s) => s.send_request(request).await,
        }
        .map_err(|e| e.to_string())?;
        Ok(response.status().as_u16())
    }
}

const POLICY_TEXT: &str = "version: 1\nroutes:\n  - match: GET /v1/jobs\n    resource: jobs\n    access: read\nprincipals:\n  victor: { kind: user, grants: ['jobs:read'] }\n";

/// Starts the proxy with TLS from `ca`; extra config appended.
async fn tls_proxy(upstream: &str, ca: &Ca, key: &TestKey, extra: &str) -> Proxy {
    let ws = Workspace::new();
    let (cert, private) = ca.issue("proxy v1");
    ws.write("cert.pem", &cert);
    ws.write("key.pem", &private);
    ws.write("ca.pem", &ca.pem());
    ws.write("policy.yaml", POLICY_TEXT);
    ws.write("keys.yaml", &keys_yaml(&[key]));
    ws.write_config(
        upstream,
        &format!("tls:\n  cert: cert.pem\n  key: key.pem\n{extra}"),
    );
    Proxy::spawn(ws).await
}

#[tokio::test]
async fn terminates_tls_with_http1_and_http2_by_alpn() {
    let backend = RecordingBackend::start().await;
    let ca = Ca::new();
    let victor = TestKey::new("victor");
    let proxy = tls_proxy(&backend.url(), &ca, &victor, "").await;
    let mut h1 = connect(proxy.addr, &ca.pem(), &[b"http/1.1"], None)
        .await
        .unwrap();
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h1.get("/v1/jobs", &victor).await.unwrap(), 200);
    let mut h2 = connect(proxy.addr, &ca.pem(), &[b"h2", b"http/1.1"], None)
        .await
        .unwrap();
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(h2.get("/v1/jobs", &victor).await.unwrap(), 200);
    assert_eq!(h2.get("/v1/nothing", &victor).await.unwrap(), 403);
    let seen = backend.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|r| r.header("x-forwarded-proto") == Some("https")));
}

#[tokio::test]
async fn a_renewed_certificate_is_served_to_new_handshakes_while_old_connections_live() {
    let backend = RecordingBackend::start().await;
    let ca = Ca::new();
    let victor = TestKey::new("victor");
    let proxy = tls_proxy(&backend.url(), &ca, &victor, "").await;
    let mut old = connect(proxy.addr, &ca.pem(), &[b"http/1.1"], None)
        .await
        .unwrap();
    assert_eq!(old.get("/v1/jobs", &victor).await.unwrap(), 200);
    let first_cert = old.peer_cert.clone();
    // cert-manager style renewal: both files replaced by rename.
    let (cert, key) = ca.issue("proxy v2");
    let ws = &proxy.workspace;
    ws.write("cert.pem.new", &cert);
    ws.write("key.pem.new", &key);
    std::fs::rename(ws.path("key.pem.new"), ws.path("key.pem")).unwrap();
    std::fs::rename(ws.path("cert.pem.new"), ws.path("cert.pem")).unwrap();
    let ca_pem = ca.pem();
    eventually(
        "new handshakes get the renewed certificate",
        PATIENCE,
        || async {
            let fresh = connect(proxy.addr, &ca_pem, &[b"http/1.1"], None)
                .await
                .unwrap();
            fresh.peer_cert != first_cert
        },
    )
    .await;
    assert_eq!(
        old.get("/v1/jobs", &victor).await.unwrap(),
        200,
        "the connection opened before the renewal still works"
    );
}

#[tokio::test]
async fn client_certificates_are_required_when_a_client_ca_is_set() {
    let backend = RecordingBackend::start().await;
    let ca = Ca::new();
    let victor = TestKey::new("victor");
    let proxy = tls_proxy(&backend.url(), &ca, &victor, "  client_ca: ca.pem\n").await;
    let refused = async {
        let mut c = connect(proxy.addr, &ca.pem(), &[b"http/1.1"], None).await?;
        c.get("/v1/jobs", &victor).await
    }
    .await;
    assert!(
        refused.is_err(),
        "no client certificate must not pass: {refused:?}"
    );
    let identity = ca.issue("client");
    let mut c = connect(proxy.addr, &ca.pem(), &[b"http/1.1"], Some(&identity))
        .await
        .unwrap();
    assert_eq!(c.get("/v1/jobs", &victor).await.unwrap(), 200);
    let stranger = Ca::new().issue("stranger");
    let refused = async {
        let mut c = connect(proxy.addr, &ca.pem(), &[b"http/1.1"], Some(&stranger)).await?;
        c.get("/v1/jobs", &victor).await
    }
    .await;
    assert!(
        refused.is_err(),
        "a certificate from another CA must not pass"
    );
    assert_eq!(backend.count(), 1);
}

/// An https backend offering h2 and http/1.1; records the HTTP version of each request.
async fn tls_backend(ca: &Ca) -> (SocketAddr, Arc<Mutex<Vec<http::Version>>>) {
    let (cert, key) = ca.issue("backend");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let versions = Arc::new(Mutex::new(Vec::new()));
    let seen = versions.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |r: Request<Incoming>| {
                    seen.lock().unwrap().push(r.version());
                    async move {
                        let _ = r.into_body().collect().await;
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(
                            b"secure",
                        ))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, versions)
}

#[tokio::test]
async fn an_https_upstream_is_trusted_by_its_ca_and_spoken_to_in_http2() {
    let ca = Ca::new();
    let (backend, versions) = tls_backend(&ca).await;
    let victor = TestKey::new("victor");
    let ws = Workspace::new();
    ws.write("backend-ca.pem", &ca.pem());
    ws.write("policy.yaml", POLICY_TEXT);
    ws.write("keys.yaml", &keys_yaml(&[&victor]));
    let upstream = format!("https://localhost:{}", backend.port());
    ws.write_config(&upstream, "upstream_tls:\n  ca: backend-ca.pem\n");
    let proxy = Proxy::spawn(ws).await;
    let auth = format!("Bearer {}", victor.key);
    let answer = get(proxy.addr, "/v1/jobs", &[("authorization", &auth)]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "secure");
    assert_eq!(
        versions.lock().unwrap().as_slice(),
        &[http::Version::HTTP_2]
    );

    // The same backend is refused when the proxy does not trust its CA.
    let ws = Workspace::new();
    ws.write("policy.yaml", POLICY_TEXT);
    ws.write("keys.yaml", &keys_yaml(&[&victor]));
    ws.write_config(&upstream, "");
    let untrusting = Proxy::spawn(ws).await;
    let answer = get(untrusting.addr, "/v1/jobs", &[("authorization", &auth)]).await;
    assert_eq!(answer.status, 502);
}

#[tokio::test]
async fn a_garbage_certificate_on_reload_is_blamed_on_the_certificate_file() {
    let backend = RecordingBackend::start().await;
    let ca = Ca::new();
    let victor = TestKey::new("victor");
    let proxy = tls_proxy(&backend.url(), &ca, &victor, "").await;
    // PEM that decodes, with no X.509 certificate inside.
    let ws = &proxy.workspace;
    ws.write(
        "cert.pem.new",
        "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZSwgbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    std::fs::rename(ws.path("cert.pem.new"), ws.path("cert.pem")).unwrap();
    eventually("the reload is rejected", PATIENCE, || async {
        proxy.stderr().contains("not a valid X.509 certificate")
    })
    .await;
    let log = proxy.stderr();
    assert!(
        log.contains("cert.pem: the first certificate is not a valid X.509 certificate"),
        "{log}"
    );
    assert!(!log.contains("unusable private key"), "{log}");
    // The last good certificate keeps serving.
    let mut c = connect(proxy.addr, &ca.pem(), &[b"http/1.1"], None)
        .await
        .unwrap();
    assert_eq!(c.get("/v1/jobs", &victor).await.unwrap(), 200);
}
