//! `portcullis demo`: the embedded default. A built-in backend, the example policy, fresh keys,
//! and the proxy in front, with curl lines that show an allow, a 401 and a 403. The backend also
//! plays an identity provider: it serves a JWK Set with a fresh Ed25519 key, and the demo prints
//! curl lines with an OAuth access token it signed with that key.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::app::{self, RunError};
use crate::cli::keys::create_key;
use crate::config::Config;
use crate::oauth::{IssuerConfig, OAuthConfig};
use crate::store::{KeysLocation, Store};

/// The policy the demo runs with.
pub const DEMO_POLICY: &str = include_str!("../policies/demo.yaml");

/// Runs the demo until Ctrl-C.
pub async fn run(listen: SocketAddr) -> Result<(), RunError> {
    let dir = tempfile::tempdir().map_err(anyhow::Error::from)?;
    let policy = dir.path().join("policy.yaml");
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&policy, DEMO_POLICY).map_err(anyhow::Error::from)?;
    let store = Store::open(&KeysLocation::File(keys.clone()));
    let mut made = Vec::new();
    for (principal, purpose) in [
        ("alice", "demo: editor"),
        ("bob", "demo: viewer"),
        ("etl-bot", "demo: robot with one dataset"),
    ] {
        let key = create_key(
            &store,
            principal,
            &[],
            Some(purpose.to_string()),
            Some("1d"),
        )
        .await
        .map_err(|e| RunError::Other(anyhow::anyhow!("{e}")))?;
        made.push(key);
    }
    let (alice, bob, robot) = (made[0].clone(), made[1].clone(), made[2].clone());
    let backend = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(anyhow::Error::from)?;
    let backend_addr = backend.local_addr().map_err(anyhow::Error::from)?;
    let provider = Provider::new(backend_addr).map_err(RunError::Other)?;
    let token = provider
        .token("alice", "datasets:read")
        .map_err(RunError::Other)?;
    tokio::spawn(serve_backend(backend, Arc::new(provider.jwks())));
    let upstream = format!("http://{backend_addr}")
        .parse()
        .map_err(|e| RunError::Other(anyhow::anyhow!("{e}")))?;
    let mut config = Config::with_upstream(upstream);
    config.listen = listen;
    config.admin = SocketAddr::from(([127, 0, 0, 1], 0));
    config.policy = policy;
    config.keys = KeysLocation::File(keys);
    config.grace_period = std::time::Duration::from_secs(2);
    config.oauth = Some(provider.config().map_err(RunError::Other)?);
    let started = app::start(&config).await?;
    print_instructions(&[&alice, &bob, &robot], &token, backend_addr, started.proxy);
    stopped().await;
    started.readiness.start_draining();
    let _ = started.stop.send(true);
    let _ = started.task.await;
    Ok(())
}

/// Ctrl-C, or SIGTERM where there is one.
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn print_instructions(keys: &[&str; 3], token: &str, backend: SocketAddr, proxy: SocketAddr) {
    let [alice, bob, robot] = *keys;
    let base = format!("http://{proxy}");
    println!();
    println!("portcullis demo: a built-in backend on http://{backend}, the proxy on {base}");
    println!("policy: alice is an editor, bob a viewer (see policies/demo.yaml). Try:");
    println!();
    println!("# allowed (200): alice reads a dataset");
    println!("curl -i -H 'Authorization: Bearer {alice}' {base}/v1/datasets/ds_1");
    println!("# 401: no key");
    println!("curl -i {base}/v1/datasets/ds_1");
    println!("# 403: bob is a viewer and may not write");
    println!("curl -i -X PUT -H 'X-API-Key: {bob}' {base}/v1/datasets/ds_1");
    println!("# filtered (200): the backend lists three datasets; etl-bot may read only ds_1, so it sees one");
    println!("curl -i -H 'Authorization: Bearer {robot}' {base}/v1/datasets");
    println!();
    println!("OAuth: an access token for alice with scope datasets:read, signed by the demo's");
    println!("identity provider (its JWK Set: http://{backend}{JWKS_PATH}):");
    println!("# allowed (200): the token may read");
    println!("curl -i -H 'Authorization: Bearer {token}' {base}/v1/datasets/ds_1");
    println!("# 403: the token's scope narrows alice to reading, so it may not write");
    println!("curl -i -X PUT -H 'Authorization: Bearer {token}' {base}/v1/datasets/ds_1");
    println!();
    println!("Ctrl-C stops the demo.");
}

/// Where the demo backend serves its identity provider's JWK Set.
const JWKS_PATH: &str = "/.well-known/jwks.json";
/// The audience the demo's tokens are for.
const DEMO_AUDIENCE: &str = "api://portcullis-demo";

/// The demo's identity provider: one Ed25519 signing key, made at start.
struct Provider {
    issuer: String,
    jwks_uri: String,
    pkcs8: Vec<u8>,
    public: Vec<u8>,
}

impl Provider {
    fn new(backend: SocketAddr) -> anyhow::Result<Provider> {
        use ring::signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| anyhow::anyhow!("cannot make the demo's signing key"))?;
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| anyhow::anyhow!("cannot read the demo's signing key"))?;
        Ok(Provider {
            issuer: format!("http://{backend}/"),
            jwks_uri: format!("http://{backend}{JWKS_PATH}"),
            public: pair.public_key().as_ref().to_vec(),
            pkcs8: pkcs8.as_ref().to_vec(),
        })
    }

    /// The issuer entry the demo proxy trusts.
    fn config(&self) -> anyhow::Result<OAuthConfig> {
        Ok(OAuthConfig {
            issuers: vec![IssuerConfig {
                issuer: self.issuer.clone(),
                jwks_uri: self.jwks_uri.parse()?,
                audience: DEMO_AUDIENCE.to_string(),
                principal_claim: "sub".to_string(),
                algorithms: vec![jsonwebtoken::Algorithm::EdDSA],
                ca: None,
            }],
            refresh_interval: std::time::Duration::from_secs(600),
            cache_size: 1024,
        })
    }

    /// The JWK Set with the public key.
    fn jwks(&self) -> Bytes {
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.public);
        let set = serde_json::json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "demo-1", "alg": "EdDSA", "use": "sig"}
        ]});
        Bytes::from(set.to_string())
    }

    /// An access token (RFC 9068 shape) for `subject`, valid for a day.
    fn token(&self, subject: &str, scope: &str) -> anyhow::Result<String> {
        let now = crate::clock::unix_now();
        let claims = serde_json::json!({
            "iss": self.issuer, "aud": DEMO_AUDIENCE, "sub": subject, "client_id": "demo-notebook",
            "scope": scope, "iat": now, "exp": now + 86_400, "jti": format!("demo-{now}"),
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some("demo-1".to_string());
        header.typ = Some("at+jwt".to_string());
        let key = jsonwebtoken::EncodingKey::from_ed_der(&self.pkcs8);
        Ok(jsonwebtoken::encode(&header, &claims, &key)?)
    }
}

async fn serve_backend(listener: TcpListener, jwks: Arc<Bytes>) {
    while let Ok((stream, _)) = listener.accept().await {
        let jwks = jwks.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |request: Request<Incoming>| {
                let jwks = jwks.clone();
                async move {
                    if request.uri().path() == JWKS_PATH {
                        let mut response = Response::new(Full::new((*jwks).clone()));
                        response.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/jwk-set+json"),
                        );
                        return Ok::<_, Infallible>(response);
                    }
                    if request.uri().path() == "/v1/datasets" {
                        return Ok::<_, Infallible>(list());
                    }
                    Ok::<_, Infallible>(echo(&request))
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The demo backend's list: every dataset, whoever asks (portcullis filters it).
fn list() -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "data": [
            {"id": "ds_1", "name": "sales"},
            {"id": "ds_2", "name": "payroll"},
            {"id": "ds_3", "name": "experiments"},
        ],
        "backend": "portcullis demo backend",
    });
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn echo(request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let body = serde_json::json!({
        "backend": "portcullis demo backend",
        "method": request.method().as_str(),
        "path": request.uri().path(),
        "principal": header("x-portcullis-principal"),
        "key_id": header("x-portcullis-key-id"),
        "credential": header("x-portcullis-credential"),
        "request_id": header("x-request-id"),
    });
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
