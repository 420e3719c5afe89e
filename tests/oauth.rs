//! OAuth 2.0 access tokens through the real binary (SPEC "OAuth 2.0 access tokens"): tokens signed
//! by the `openssl` command-line tool (an implementation independent of the proxy) with RS256,
//! PS256, ES256 and EdDSA keys, a JWK Set served from a small HTTP server on loopback whose set
//! can be replaced while it runs and which counts its fetches, and the proxy's answers, backend
//! headers, audit events, metrics, key rotation, forged `kid` floods, a provider that goes away,
//! and `check`/`explain` on the command line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use prometheus_parse::{Scrape, Value as Metric};
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The main issuer: every algorithm allowed, principal from `sub`.
const ISS: &str = "https://idp.test/";
/// An issuer that allows RS256 only.
const STRICT_ISS: &str = "https://strict.test/";
/// An issuer whose principal claim is `preferred_username`.
const NAMES_ISS: &str = "https://names.test/";
/// The audience every issuer requires.
const AUD: &str = "api://datasets";

// ---------------------------------------------------------------------------
// openssl: keys, signatures, JWKs
// ---------------------------------------------------------------------------

/// Runs `openssl` with `input` on stdin and returns stdout; panics on failure.
fn openssl(args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = std::process::Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `openssl` with the private key as the file `KEY` and `input` as the file `INPUT` (both
/// deleted afterwards) as well as on stdin: one-shot operations (Ed25519) need a file.
fn openssl_with_key(pem: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let temp = |bytes: &[u8]| {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        file.flush().unwrap();
        file
    };
    let (key, data) = (temp(pem.as_bytes()), temp(input));
    let (key_path, data_path) = (
        key.path().to_str().unwrap().to_string(),
        data.path().to_str().unwrap().to_string(),
    );
    let args: Vec<&str> = args
        .iter()
        .map(|a| match *a {
            "KEY" => key_path.as_str(),
            "INPUT" => data_path.as_str(),
            other => other,
        })
        .collect();
    openssl(&args, input)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kty {
    Rsa,
    P256,
    Ed25519,
}

/// A private key (PEM) and its public JWK (without `kid`).
struct SigningKey {
    kty: Kty,
    pem: String,
    public_pem: String,
    public_der: Vec<u8>,
    jwk: Value,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl SigningKey {
    fn generate(kty: Kty) -> SigningKey {
        let args: &[&str] = match kty {
            Kty::Rsa => &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            Kty::P256 => &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ],
            Kty::Ed25519 => &["genpkey", "-algorithm", "ED25519"],
        };
        let pem = String::from_utf8(openssl(args, b"")).unwrap();
        let public_pem = String::from_utf8(openssl(&["pkey", "-pubout"], pem.as_bytes())).unwrap();
        let public_der = openssl(&["pkey", "-pubout", "-outform", "DER"], pem.as_bytes());
        let jwk = match kty {
            Kty::Rsa => rsa_jwk(&public_pem),
            Kty::P256 => {
                // SubjectPublicKeyInfo ends with the uncompressed point 04 || x || y.
                let point = &public_der[public_der.len() - 65..];
                assert_eq!(point[0], 4, "uncompressed P-256 point");
                json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..])})
            }
            Kty::Ed25519 => {
                assert_eq!(public_der.len(), 44, "Ed25519 SubjectPublicKeyInfo");
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64(&public_der[12..])})
            }
        };
        SigningKey {
            kty,
            pem,
            public_pem,
            public_der,
            jwk,
        }
    }

    /// The public JWK named `kid`.
    fn jwk(&self, kid: &str) -> Value {
        let mut jwk = self.jwk.clone();
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        jwk
    }

    /// The JWS signature of `input` for `alg`, as the JWS wants it (raw r||s for ES256).
    fn sign(&self, alg: &str, input: &[u8]) -> Vec<u8> {
        match (alg, self.kty) {
            ("RS256", Kty::Rsa) => {
                openssl_with_key(&self.pem, &["dgst", "-sha256", "-sign", "KEY"], input)
            }
            ("PS256", Kty::Rsa) => openssl_with_key(
                &self.pem,
                &[
                    "dgst",
                    "-sha256",
                    "-sigopt",
                    "rsa_padding_mode:pss",
                    "-sigopt",
                    "rsa_pss_saltlen:32",
                    "-sign",
                    "KEY",
                ],
                input,
            ),
            ("ES256", Kty::P256) => {
                let der = openssl_with_key(&self.pem, &["dgst", "-sha256", "-sign", "KEY"], input);
                ecdsa_der_to_raw(&der)
            }
            ("EdDSA", Kty::Ed25519) => openssl_with_key(
                &self.pem,
                &[
                    "pkeyutl", "-sign", "-rawin", "-inkey", "KEY", "-in", "INPUT",
                ],
                input,
            ),
            other => panic!("cannot sign {other:?}"),
        }
    }
}

/// n and e of an RSA public key, read from `openssl rsa -pubin` output.
fn rsa_jwk(public_pem: &str) -> Value {
    let modulus = String::from_utf8(openssl(
        &["rsa", "-pubin", "-modulus", "-noout"],
        public_pem.as_bytes(),
    ))
    .unwrap();
    let n = hex::decode(modulus.trim().strip_prefix("Modulus=").unwrap()).unwrap();
    let text = String::from_utf8(openssl(
        &["rsa", "-pubin", "-text", "-noout"],
        public_pem.as_bytes(),
    ))
    .unwrap();
    let e: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Exponent: "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let e_bytes: Vec<u8> = e
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    json!({"kty": "RSA", "n": b64(&n), "e": b64(&e_bytes)})
}

/// A DER `ECDSA-Sig-Value` (SEQUENCE { r INTEGER, s INTEGER }) as the 64-byte r || s of JWS.
fn ecdsa_der_to_raw(der: &[u8]) -> Vec<u8> {
    assert_eq!(der[0], 0x30, "DER SEQUENCE");
    // P-256 signatures are at most 72 bytes: short-form lengths only.
    assert!(der[1] < 0x80 && der[1] as usize == der.len() - 2);
    let mut rest = &der[2..];
    let mut out = Vec::new();
    for _ in 0..2 {
        assert_eq!(rest[0], 0x02, "DER INTEGER");
        let len = rest[1] as usize;
        let int = &rest[2..2 + len];
        let int: Vec<u8> = int.iter().copied().skip_while(|b| *b == 0).collect();
        assert!(int.len() <= 32);
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend(int);
        rest = &rest[2 + len..];
    }
    assert!(rest.is_empty());
    out
}

/// The keys every test signs with, generated once per test binary (in memory).
struct Keys {
    rsa_a: SigningKey,
    rsa_b: SigningKey,
    ec: SigningKey,
    ed: SigningKey,
    /// An attacker's key, in no JWK Set.
    rogue: SigningKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        rsa_a: SigningKey::generate(Kty::Rsa),
        rsa_b: SigningKey::generate(Kty::Rsa),
        ec: SigningKey::generate(Kty::P256),
        ed: SigningKey::generate(Kty::Ed25519),
        rogue: SigningKey::generate(Kty::P256),
    })
}

/// The set most tests serve: RSA key A, the P-256 key and the Ed25519 key.
fn standard_set() -> Value {
    let k = keys();
    json!({"keys": [k.rsa_a.jwk("rsa-a"), k.ec.jwk("ec-1"), k.ed.jwk("ed-1")]})
}

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims of a token the main issuer would issue for `sub`, valid for five minutes.
fn claims(sub: &str) -> Value {
    let t = now();
    json!({
        "iss": ISS,
        "aud": AUD,
        "sub": sub,
        "iat": t,
        "exp": t + 300,
        "jti": random_alnum(16),
    })
}

fn claims_with(sub: &str, extra: Value) -> Value {
    let mut c = claims(sub);
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn encode_part(v: &Value) -> String {
    b64(v.to_string().as_bytes())
}

/// A compact JWS: `alg`, `kid`, the claims, signed by `key`.
fn jwt(key: &SigningKey, alg: &str, kid: &str, claims: &Value) -> String {
    let header = json!({"alg": alg, "typ": "at+jwt", "kid": kid});
    let input = format!("{}.{}", encode_part(&header), encode_part(claims));
    let sig = key.sign(alg, input.as_bytes());
    format!("{input}.{}", b64(&sig))
}

/// HS256 with `secret` as the HMAC key, computed by openssl.
fn hs256(kid: &str, claims: &Value, secret: &[u8]) -> String {
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": kid});
    let input = format!("{}.{}", encode_part(&header), encode_part(claims));
    let macopt = format!("hexkey:{}", hex::encode(secret));
    let mac = openssl(
        &[
            "dgst", "-sha256", "-binary", "-mac", "HMAC", "-macopt", &macopt,
        ],
        input.as_bytes(),
    );
    format!("{input}.{}", b64(&mac))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn call(addr: SocketAddr, method: &str, path: &str, token: &str) -> Resp {
    let auth = bearer(token);
    send(addr, method, path, &[("authorization", &auth)], "").await
}

// ---------------------------------------------------------------------------
// The identity provider's JWK Set endpoint
// ---------------------------------------------------------------------------

/// A plain HTTP/1.1 server on loopback answering every GET with the current set; counts GETs
/// per path. Stopped (its port closed) by `stop` or when dropped.
struct JwksServer {
    addr: SocketAddr,
    set: Arc<Mutex<String>>,
    fetches: Arc<Mutex<HashMap<String, usize>>>,
    task: Option<JoinHandle<()>>,
}

impl JwksServer {
    async fn start(set: Value) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(set.to_string()));
        let fetches = Arc::new(Mutex::new(HashMap::new()));
        let (b, f) = (body.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            // Owned here, so stopping the server also ends every connection it serves.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                while connections.try_join_next().is_some() {}
                let (b, f) = (b.clone(), f.clone());
                connections.spawn(async move {
                    let _ = tokio::time::timeout(PATIENCE, serve_jwks(stream, b, f)).await;
                });
            }
        });
        JwksServer {
            addr,
            set: body,
            fetches,
            task: Some(task),
        }
    }

    fn uri(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Replaces the served set.
    fn serve(&self, set: Value) {
        *self.set.lock().unwrap() = set.to_string();
    }

    fn fetches(&self, path: &str) -> usize {
        self.fetches.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// Closes the port and ends every connection.
    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn serve_jwks(
    mut stream: tokio::net::TcpStream,
    body: Arc<Mutex<String>>,
    fetches: Arc<Mutex<HashMap<String, usize>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut request_line = head.lines().next().unwrap_or("").split(' ');
    let (method, path) = (request_line.next(), request_line.next());
    let response = match (method, path) {
        (Some("GET"), Some(path)) => {
            *fetches.lock().unwrap().entry(path.to_string()).or_default() += 1;
            let body = body.lock().unwrap().clone();
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/jwk-set+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        _ => "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_string(),
    };
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

// ---------------------------------------------------------------------------
// The proxy with oauth configured
// ---------------------------------------------------------------------------

/// The `oauth:` block (and a JSON-lines audit file) for three issuers on `idp`, each with its
/// own path so fetches can be counted per issuer.
fn oauth_config(idp: &JwksServer, extra: &str, oauth_extra: &str) -> String {
    format!(
        "audit:\n  file: audit.jsonl\n{extra}oauth:\n{oauth_extra}  issuers:\n    - issuer: {ISS}\n      jwks_uri: {}\n      audience: {AUD}\n    - issuer: {STRICT_ISS}\n      jwks_uri: {}\n      audience: {AUD}\n      algorithms: [RS256]\n    - issuer: {NAMES_ISS}\n      jwks_uri: {}\n      audience: {AUD}\n      principal_claim: preferred_username\n",
        idp.uri("/main/jwks"),
        idp.uri("/strict/jwks"),
        idp.uri("/names/jwks"),
    )
}

/// A backend, a JWK Set server with [`standard_set`], and the proxy running [`POLICY`].
struct Setup {
    backend: RecordingBackend,
    idp: JwksServer,
    proxy: Proxy,
}

impl Setup {
    async fn start() -> Setup {
        Setup::start_with("", &[]).await
    }

    async fn start_with(extra_config: &str, keys: &[&TestKey]) -> Setup {
        Setup::start_full(extra_config, "", keys).await
    }

    /// `extra_config` goes into `portcullis.yaml`, `oauth_extra` into its `oauth:` block.
    async fn start_full(extra_config: &str, oauth_extra: &str, keys: &[&TestKey]) -> Setup {
        let backend = RecordingBackend::start().await;
        let idp = JwksServer::start(standard_set()).await;
        let proxy = Proxy::start(
            &backend.url(),
            POLICY,
            &keys_yaml(keys),
            &oauth_config(&idp, extra_config, oauth_extra),
        )
        .await;
        Setup {
            backend,
            idp,
            proxy,
        }
    }

    async fn call(&self, method: &str, path: &str, token: &str) -> Resp {
        call(self.proxy.addr, method, path, token).await
    }

    fn ws(&self) -> &Workspace {
        &self.proxy.workspace
    }
}

fn events(ws: &Workspace) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(ws.path("audit.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn decisions(ws: &Workspace) -> Vec<Value> {
    events(ws)
        .into_iter()
        .filter(|e| e["kind"] == "decision")
        .collect()
}

/// Waits until `n` decision events are written, then returns them.
async fn wait_decisions(ws: &Workspace, n: usize) -> Vec<Value> {
    eventually(&format!("{n} decision events"), PATIENCE, || async {
        decisions(ws).len() >= n
    })
    .await;
    decisions(ws)
}

async fn scrape(proxy: &Proxy) -> Scrape {
    let text = get(proxy.admin, "/metrics", &[]).await.text();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

fn metric(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => *v,
            _ => 0.0,
        })
        .sum()
}

/// A 401 for an invalid token: problem+json, `WWW-Authenticate: Bearer ... error="invalid_token"`.
fn assert_invalid_token(resp: &Resp, token: &str, what: &str) {
    assert_eq!(resp.status, 401, "{what}: {}", resp.text());
    assert_problem(resp, 401, &[token]);
    let challenges: Vec<&str> = resp
        .headers
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        challenges
            .iter()
            .any(|c| c.starts_with("Bearer ") && c.contains("error=\"invalid_token\"")),
        "{what}: WWW-Authenticate was {challenges:?}"
    );
}

/// Asserts nothing the backend received carries the token or any of its three parts.
fn assert_token_absent(r: &Recorded, token: &str) {
    assert!(
        r.header("authorization").is_none(),
        "backend got Authorization: {:?}",
        r.header("authorization")
    );
    for (name, value) in &r.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        for part in token.split('.') {
            assert!(
                !value.contains(part),
                "backend header {name} carries part of the token: {value}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 1. Every algorithm, and what the backend sees
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_signed_with_each_algorithm_are_allowed_and_the_backend_sees_the_principal() {
    let s = Setup::start().await;
    let k = keys();
    let cases = [
        (
            "RS256",
            jwt(&k.rsa_a, "RS256", "rsa-a", &claims("alice")),
            "/v1/datasets/ds_1",
            "alice",
            "user",
        ),
        (
            "PS256",
            jwt(&k.rsa_a, "PS256", "rsa-a", &claims("victor")),
            "/v1/datasets/ds_1",
            "victor",
            "user",
        ),
        (
            "ES256",
            jwt(&k.ec, "ES256", "ec-1", &claims("etl-bot")),
            "/v1/jobs",
            "etl-bot",
            "robot",
        ),
        (
            "EdDSA",
            jwt(&k.ed, "EdDSA", "ed-1", &claims("victor")),
            "/v1/datasets",
            "victor",
            "user",
        ),
        (
            "RS256 with aud as an array holding the audience",
            jwt(
                &k.rsa_a,
                "RS256",
                "rsa-a",
                &claims_with("alice", json!({"aud": ["api://other", AUD]})),
            ),
            "/v1/datasets",
            "alice",
            "user",
        ),
    ];
    for (i, (alg, token, path, principal, kind)) in cases.iter().enumerate() {
        let r = s.call("GET", path, token).await;
        assert_eq!(r.status, 200, "{alg}: {}", r.text());
        let all = s.backend.requests();
        assert_eq!(all.len(), i + 1, "{alg}: the backend saw the request");
        let seen = all.last().unwrap();
        assert_eq!(seen.path(), *path, "{alg}");
        assert_eq!(
            seen.header("x-portcullis-principal"),
            Some(*principal),
            "{alg}"
        );
        assert_eq!(
            seen.header("x-portcullis-principal-kind"),
            Some(*kind),
            "{alg}"
        );
        assert_eq!(
            seen.header("x-portcullis-credential"),
            Some("oauth"),
            "{alg}"
        );
        assert!(
            seen.header("x-portcullis-key-id").is_none(),
            "{alg}: a token has no key id"
        );
        assert_token_absent(seen, token);
    }
    // A client cannot name itself: identity headers it sends are replaced.
    let token = jwt(&k.ec, "ES256", "ec-1", &claims("victor"));
    let auth = bearer(&token);
    let r = get(
        s.proxy.addr,
        "/v1/datasets",
        &[
            ("authorization", &auth),
            ("x-portcullis-principal", "alice"),
            ("x-portcullis-credential", "key"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s.backend.requests().pop().unwrap();
    assert_eq!(seen.header("x-portcullis-principal"), Some("victor"));
    assert_eq!(seen.header("x-portcullis-credential"), Some("oauth"));
    assert_eq!(
        seen.headers
            .get_all("x-portcullis-principal")
            .iter()
            .count(),
        1
    );
}

// ---------------------------------------------------------------------------
// 2. Invalid tokens
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tampered_and_misaddressed_tokens_get_401_invalid_token() {
    let s = Setup::start().await;
    let k = keys();
    let good = jwt(&k.rsa_a, "RS256", "rsa-a", &claims("victor"));
    let unsigned = format!(
        "{}.{}.",
        encode_part(&json!({"alg": "none", "typ": "JWT", "kid": "rsa-a"})),
        encode_part(&claims("alice"))
    );
    // Each algorithm's signature of victor's claims, sent with alice's claims instead.
    let tampered = |key: &SigningKey, alg: &str, kid: &str| {
        let original = jwt(key, alg, kid, &claims("victor"));
        let parts: Vec<&str> = original.split('.').collect();
        format!(
            "{}.{}.{}",
            parts[0],
            encode_part(&claims("alice")),
            parts[2]
        )
    };
    let mut cases: Vec<(&str, String)> = vec![
        (
            "RS256 payload changed after signing",
            tampered(&k.rsa_a, "RS256", "rsa-a"),
        ),
        (
            "PS256 payload changed after signing",
            tampered(&k.rsa_a, "PS256", "rsa-a"),
        ),
        (
            "ES256 payload changed after signing",
            tampered(&k.ec, "ES256", "ec-1"),
        ),
        (
            "EdDSA payload changed after signing",
            tampered(&k.ed, "EdDSA", "ed-1"),
        ),
        ("alg none, unsigned", unsigned),
        (
            "HS256 keyed with the RSA public key (PEM)",
            hs256("rsa-a", &claims("alice"), k.rsa_a.public_pem.as_bytes()),
        ),
        (
            "HS256 keyed with the RSA public key (DER)",
            hs256("rsa-a", &claims("alice"), &k.rsa_a.public_der),
        ),
        (
            "ES256 to an issuer that allows RS256 only",
            jwt(
                &k.ec,
                "ES256",
                "ec-1",
                &claims_with("alice", json!({"iss": STRICT_ISS})),
            ),
        ),
        (
            "PS256 to an issuer that allows RS256 only",
            jwt(
                &k.rsa_a,
                "PS256",
                "rsa-a",
                &claims_with("alice", json!({"iss": STRICT_ISS})),
            ),
        ),
        (
            "signed by a key outside the set, under a kid of the set",
            jwt(&k.rogue, "ES256", "ec-1", &claims("alice")),
        ),
        (
            "wrong iss",
            jwt(
                &k.rsa_a,
                "RS256",
                "rsa-a",
                &claims_with("alice", json!({"iss": "https://evil.test/"})),
            ),
        ),
        (
            "wrong aud",
            jwt(
                &k.rsa_a,
                "RS256",
                "rsa-a",
                &claims_with("alice", json!({"aud": "api://other"})),
            ),
        ),
        (
            "aud array without the audience",
            jwt(
                &k.ed,
                "EdDSA",
                "ed-1",
                &claims_with("alice", json!({"aud": ["api://a", "api://b"]})),
            ),
        ),
        ("garbage", "garbage".to_string()),
        ("three garbage parts", "a.b.c".to_string()),
    ];
    // RS256 signed by the set's RSA key but labelled PS256 (and the reverse).
    let relabel = |alg: &str, to: &str| {
        let original = jwt(&k.rsa_a, alg, "rsa-a", &claims("alice"));
        let parts: Vec<&str> = original.split('.').collect();
        let header = json!({"alg": to, "typ": "at+jwt", "kid": "rsa-a"});
        format!("{}.{}.{}", encode_part(&header), parts[1], parts[2])
    };
    cases.push(("RS256 signature labelled PS256", relabel("RS256", "PS256")));
    cases.push(("PS256 signature labelled RS256", relabel("PS256", "RS256")));
    for (what, token) in &cases {
        let r = s.call("GET", "/v1/datasets/ds_1", token).await;
        assert_invalid_token(&r, token, what);
    }
    assert_eq!(s.backend.count(), 0, "no invalid token reached the backend");
    let d = wait_decisions(s.ws(), cases.len()).await;
    for (event, (what, _)) in d.iter().zip(&cases) {
        assert_eq!(event["reason"], "invalid_token", "{what}: {event}");
        assert_eq!(event["status"], 401, "{what}: {event}");
        assert!(event["principal"].is_null(), "{what}: {event}");
    }
    // The untampered original is fine.
    assert_eq!(s.call("GET", "/v1/datasets/ds_1", &good).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exp_and_nbf_hold_within_60_seconds_of_skew() {
    let s = Setup::start().await;
    let k = keys();
    let t = now();
    let sign = |extra: Value| jwt(&k.ec, "ES256", "ec-1", &claims_with("victor", extra));
    let refused = [
        ("exp 120 s ago", sign(json!({"exp": t - 120}))),
        ("nbf 120 s ahead", sign(json!({"nbf": t + 120}))),
        ("no exp", sign(json!({"exp": null}))),
    ];
    for (what, token) in &refused {
        let r = s.call("GET", "/v1/datasets", token).await;
        assert_invalid_token(&r, token, what);
    }
    assert_eq!(s.backend.count(), 0);
    let accepted = [
        ("exp 30 s ago", sign(json!({"exp": t - 30}))),
        ("nbf 30 s ahead", sign(json!({"nbf": t + 30}))),
    ];
    for (what, token) in &accepted {
        let r = s.call("GET", "/v1/datasets", token).await;
        assert_eq!(r.status, 200, "{what}: {}", r.text());
    }
    assert_eq!(s.backend.count(), 2);
    let d = wait_decisions(s.ws(), 5).await;
    let reasons: Vec<&str> = d.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(
        reasons,
        [
            "invalid_token",
            "invalid_token",
            "invalid_token",
            "granted",
            "granted"
        ]
    );
}

// ---------------------------------------------------------------------------
// 3. Principals
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_not_in_the_policy_gets_403_unknown_principal() {
    let s = Setup::start().await;
    let k = keys();
    let mallory = jwt(&k.rsa_a, "RS256", "rsa-a", &claims("mallory"));
    let r = s.call("GET", "/v1/datasets", &mallory).await;
    assert_problem(&r, 403, &[&mallory]);
    assert!(r.header("www-authenticate").is_none());
    // principal_claim names the claim: sub "mallory" with preferred_username "alice" is alice.
    let named = jwt(
        &k.rsa_a,
        "RS256",
        "rsa-a",
        &claims_with(
            "mallory",
            json!({"iss": NAMES_ISS, "preferred_username": "alice"}),
        ),
    );
    let r = s.call("PUT", "/v1/datasets/ds_1", &named).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        s.backend.single().header("x-portcullis-principal"),
        Some("alice")
    );
    // ...and on that issuer, a token without the claim names nobody.
    let unnamed = jwt(
        &k.rsa_a,
        "RS256",
        "rsa-a",
        &claims_with("alice", json!({"iss": NAMES_ISS})),
    );
    let r = s.call("GET", "/v1/datasets", &unnamed).await;
    assert_ne!(r.status, 200, "{}", r.text());
    assert_eq!(s.backend.count(), 1);
    let d = wait_decisions(s.ws(), 3).await;
    assert_eq!(d[0]["reason"], "unknown_principal", "{}", d[0]);
    assert_eq!(d[0]["status"], 403);
    assert_eq!(d[1]["reason"], "granted");
    assert_eq!(d[1]["principal"], "alice");
    assert_eq!(d[1]["issuer"], NAMES_ISS);
}

// ---------------------------------------------------------------------------
// 4. Scopes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_shaped_scopes_narrow_the_principal_and_other_scopes_are_ignored() {
    let s = Setup::start().await;
    let k = keys();
    let token = |extra: Value| jwt(&k.rsa_a, "RS256", "rsa-a", &claims_with("alice", extra));
    // (what, token, method, path, expected)
    let read_only = token(json!({"scope": "openid datasets:read"}));
    let scp_read_only = token(json!({"scp": ["datasets:read", "offline_access"]}));
    let no_grants = token(json!({"scope": "openid profile"}));
    let no_scope = token(json!({}));
    let widen = jwt(
        &k.rsa_a,
        "RS256",
        "rsa-a",
        &claims_with("victor", json!({"scope": "datasets:write"})),
    );
    let cases: Vec<(&str, &String, &str, &str, u16)> = vec![
        (
            "scope datasets:read, write",
            &read_only,
            "PUT",
            "/v1/datasets/ds_1",
            403,
        ),
        (
            "scope datasets:read, read",
            &read_only,
            "GET",
            "/v1/datasets/ds_1",
            200,
        ),
        (
            "scope datasets:read, other resource",
            &read_only,
            "GET",
            "/v1/jobs",
            403,
        ),
        (
            "scp [datasets:read], write",
            &scp_read_only,
            "POST",
            "/v1/datasets",
            403,
        ),
        (
            "scp [datasets:read], read",
            &scp_read_only,
            "GET",
            "/v1/datasets",
            200,
        ),
        (
            "openid profile, write",
            &no_grants,
            "PUT",
            "/v1/datasets/ds_1",
            200,
        ),
        ("openid profile, jobs", &no_grants, "GET", "/v1/jobs", 200),
        (
            "no scope at all, write",
            &no_scope,
            "POST",
            "/v1/datasets",
            200,
        ),
        (
            "a scope cannot widen (viewer + datasets:write)",
            &widen,
            "PUT",
            "/v1/datasets/ds_1",
            403,
        ),
    ];
    let mut forwarded = 0;
    for (what, token, method, path, expected) in &cases {
        let r = s.call(method, path, token).await;
        assert_eq!(r.status, *expected, "{what}: {}", r.text());
        if *expected == 200 {
            forwarded += 1;
        }
        assert_eq!(s.backend.count(), forwarded, "{what}");
    }
    let d = wait_decisions(s.ws(), cases.len()).await;
    for (event, (what, _, _, _, expected)) in d.iter().zip(&cases) {
        let reason = if *expected == 200 {
            "granted"
        } else {
            "forbidden"
        };
        assert_eq!(event["reason"], reason, "{what}: {event}");
    }
}

// ---------------------------------------------------------------------------
// 5. Audit
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_carry_credential_issuer_and_client_but_never_the_token() {
    let key = TestKey::new("victor");
    let s = Setup::start_with("log:\n  level: debug\n  access_log: true\n", &[&key]).await;
    let k = keys();
    let azp = jwt(
        &k.rsa_a,
        "RS256",
        "rsa-a",
        &claims_with("alice", json!({"azp": "tableau"})),
    );
    let client_id = jwt(
        &k.ed,
        "EdDSA",
        "ed-1",
        &claims_with("victor", json!({"client_id": "notebook"})),
    );
    let strict = jwt(
        &k.rsa_a,
        "RS256",
        "rsa-a",
        &claims_with("etl-bot", json!({"iss": STRICT_ISS, "client_id": "etl"})),
    );
    let forbidden = jwt(
        &k.ec,
        "ES256",
        "ec-1",
        &claims_with("victor", json!({"azp": "bi"})),
    );
    let invalid = jwt(
        &k.rsa_a,
        "RS256",
        "rsa-a",
        &claims_with("alice", json!({"aud": "api://other"})),
    );
    assert_eq!(s.call("GET", "/v1/datasets", &azp).await.status, 200);
    assert_eq!(s.call("GET", "/v1/datasets", &client_id).await.status, 200);
    assert_eq!(s.call("GET", "/v1/jobs", &strict).await.status, 200);
    assert_eq!(
        s.call("PUT", "/v1/datasets/ds_1", &forbidden).await.status,
        403
    );
    assert_eq!(s.call("GET", "/v1/datasets", &invalid).await.status, 401);
    let r = get(
        s.proxy.addr,
        "/v1/datasets",
        &[("authorization", &bearer(&key.key))],
    )
    .await;
    assert_eq!(r.status, 200);

    let d = wait_decisions(s.ws(), 6).await;
    let expect = [
        ("alice", ISS, Some("tableau"), "granted"),
        ("victor", ISS, Some("notebook"), "granted"),
        ("etl-bot", STRICT_ISS, Some("etl"), "granted"),
        ("victor", ISS, Some("bi"), "forbidden"),
    ];
    for (event, (principal, issuer, client, reason)) in d.iter().zip(expect) {
        assert_eq!(event["reason"], reason, "{event}");
        assert_eq!(event["credential"], "oauth", "{event}");
        assert_eq!(event["principal"], principal, "{event}");
        assert_eq!(event["issuer"], issuer, "{event}");
        assert_eq!(event["client_id"].as_str(), client, "{event}");
        assert!(event["key_id"].is_null(), "{event}");
        assert!(event["key_prefix"].is_null(), "{event}");
    }
    assert_eq!(d[4]["reason"], "invalid_token");
    assert_eq!(d[5]["credential"], "key", "{}", d[5]);
    assert_eq!(d[5]["key_id"], key.id.as_str());
    assert!(d[5]["issuer"].is_null(), "{}", d[5]);
    assert!(d[5]["client_id"].is_null(), "{}", d[5]);

    let audit = s.ws().read("audit.jsonl");
    let stderr = s.proxy.stderr();
    for token in [&azp, &client_id, &strict, &forbidden, &invalid] {
        for part in token.split('.').skip(1) {
            assert!(!audit.contains(part), "a token part is in the audit file");
            assert!(!stderr.contains(part), "a token part is in stderr");
        }
    }
}

// ---------------------------------------------------------------------------
// 6, 7. Rotation and forged kids
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_signing_key_works_at_once_and_forged_kids_cannot_flood_the_provider() {
    let s = Setup::start().await;
    let k = keys();
    let main = "/main/jwks";
    assert_eq!(s.idp.fetches(main), 1, "one fetch at start");
    let before = jwt(&k.rsa_a, "RS256", "rsa-a", &claims("victor"));
    assert_eq!(s.call("GET", "/v1/datasets", &before).await.status, 200);
    assert_eq!(s.idp.fetches(main), 1, "a known kid needs no fetch");

    // The provider rotates: key A is gone, key B signs.
    s.idp.serve(json!({"keys": [k.rsa_b.jwk("rsa-b")]}));
    let rotated = jwt(&k.rsa_b, "RS256", "rsa-b", &claims("victor"));
    let r = s.call("GET", "/v1/datasets", &rotated).await;
    assert_eq!(
        r.status,
        200,
        "a token of the new key, first try: {}",
        r.text()
    );
    assert_eq!(s.idp.fetches(main), 2, "the unknown kid caused one refresh");
    // A fresh token of the retired key is no longer trusted.
    let retired = jwt(&k.rsa_a, "RS256", "rsa-a", &claims("victor"));
    let r = s.call("GET", "/v1/datasets", &retired).await;
    assert_invalid_token(&r, &retired, "retired key A");
    // Nor is the token of that key accepted (and cached) before the rotation.
    let r = s.call("GET", "/v1/datasets", &before).await;
    assert_invalid_token(&r, &before, "a cached token of retired key A");

    // 50 tokens with random kids, at once, right after that refresh.
    let forged: Vec<String> = (0..50)
        .map(|_| {
            let kid = random_alnum(12);
            jwt(&k.rogue, "ES256", &kid, &claims("alice"))
        })
        .collect();
    let started = Instant::now();
    let answers =
        futures_util::future::join_all(forged.iter().map(|t| s.call("GET", "/v1/datasets", t)))
            .await;
    for (resp, token) in answers.iter().zip(&forged) {
        assert_invalid_token(resp, token, "forged kid");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the flood took {:?}",
        started.elapsed()
    );
    let extra = s.idp.fetches(main) - 2;
    assert!(
        extra == 0,
        "forged kids within 30 s of the last refresh caused {extra} more fetches"
    );
    assert_eq!(s.backend.count(), 2);
    // The new key keeps working.
    let again = jwt(&k.rsa_b, "RS256", "rsa-b", &claims("alice"));
    assert_eq!(s.call("GET", "/v1/datasets", &again).await.status, 200);

    let m = scrape(&s.proxy).await;
    let refreshes = "portcullis_jwks_refreshes_total";
    assert_eq!(
        metric(
            &m,
            refreshes,
            &[("issuer", ISS), ("reason", "unknown_kid"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            refreshes,
            &[("issuer", ISS), ("reason", "start"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        metric(&m, refreshes, &[("issuer", ISS), ("result", "error")]),
        0.0
    );
    assert_eq!(s.idp.fetches("/strict/jwks"), 1, "other issuers untouched");
    // The window is per issuer: the other issuer still refreshes for its own rotation.
    let strict = jwt(
        &k.rsa_b,
        "RS256",
        "rsa-b",
        &claims_with("victor", json!({"iss": STRICT_ISS})),
    );
    let r = s.call("GET", "/v1/datasets", &strict).await;
    assert_eq!(r.status, 200, "the strict issuer's rotation: {}", r.text());
    assert_eq!(s.idp.fetches("/strict/jwks"), 2);
    assert_eq!(s.idp.fetches(main), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_kids_cause_at_most_one_fetch_per_30_seconds() {
    let s = Setup::start().await;
    let k = keys();
    let forged: Vec<String> = (0..50)
        .map(|_| jwt(&k.rogue, "ES256", &random_alnum(12), &claims("alice")))
        .collect();
    let answers =
        futures_util::future::join_all(forged.iter().map(|t| s.call("GET", "/v1/datasets", t)))
            .await;
    for (resp, token) in answers.iter().zip(&forged) {
        assert_invalid_token(resp, token, "forged kid");
    }
    // One sequential burst too, after the concurrent one.
    for _ in 0..10 {
        let t = jwt(&k.rogue, "ES256", &random_alnum(12), &claims("alice"));
        assert_eq!(s.call("GET", "/v1/datasets", &t).await.status, 401);
    }
    let fetches = s.idp.fetches("/main/jwks");
    assert!(
        fetches <= 2,
        "start + at most one refresh, got {fetches} fetches"
    );
    assert_eq!(s.backend.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_set_is_refreshed_in_the_background() {
    let s = Setup::start_full("", "  refresh_interval: 10s\n", &[]).await;
    let k = keys();
    let main = "/main/jwks";
    assert_eq!(s.idp.fetches(main), 1);
    s.idp.serve(json!({"keys": [k.rsa_b.jwk("rsa-b")]}));
    eventually(
        "a background refresh within the 10 s interval",
        Duration::from_secs(15),
        || async { s.idp.fetches(main) >= 2 },
    )
    .await;
    // Key B is known before any token asks for it: no refresh on the request path.
    let fetched = s.idp.fetches(main);
    let rotated = jwt(&k.rsa_b, "RS256", "rsa-b", &claims("victor"));
    assert_eq!(s.call("GET", "/v1/datasets", &rotated).await.status, 200);
    assert_eq!(
        s.idp.fetches(main),
        fetched,
        "key B came with the background refresh"
    );
    let m = scrape(&s.proxy).await;
    let refreshes = "portcullis_jwks_refreshes_total";
    assert_eq!(
        metric(&m, refreshes, &[("issuer", ISS), ("reason", "unknown_kid")]),
        0.0
    );
    // Key A left the set: its new tokens are refused.
    let retired = jwt(&k.rsa_a, "RS256", "rsa-a", &claims("victor"));
    let r = s.call("GET", "/v1/datasets", &retired).await;
    assert_invalid_token(&r, &retired, "key A after the background refresh");
    assert!(
        metric(
            &m,
            refreshes,
            &[("issuer", ISS), ("reason", "background"), ("result", "ok")]
        ) >= 1.0
    );
}

// ---------------------------------------------------------------------------
// 8. The provider goes away
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_provider_is_down_the_last_good_keys_stay_in_use() {
    let mut s = Setup::start().await;
    let k = keys();
    let first = jwt(&k.rsa_a, "RS256", "rsa-a", &claims("victor"));
    assert_eq!(s.call("GET", "/v1/datasets", &first).await.status, 200);
    s.idp.stop().await;
    let addr = s.idp.addr;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the provider's port is closed"
    );
    // An unknown kid now makes the proxy try the provider, which fails...
    let stray = jwt(&k.rogue, "ES256", "new-kid", &claims("victor"));
    assert_eq!(s.call("GET", "/v1/datasets", &stray).await.status, 401);
    // ...and new tokens of every known key keep being accepted.
    let fresh = [
        jwt(&k.rsa_a, "RS256", "rsa-a", &claims("victor")),
        jwt(&k.rsa_a, "PS256", "rsa-a", &claims("alice")),
        jwt(&k.ec, "ES256", "ec-1", &claims("victor")),
        jwt(&k.ed, "EdDSA", "ed-1", &claims("alice")),
    ];
    for token in &fresh {
        let r = s.call("GET", "/v1/datasets", token).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(s.backend.count(), 5);
    let m = scrape(&s.proxy).await;
    assert_eq!(
        metric(
            &m,
            "portcullis_jwks_refreshes_total",
            &[
                ("issuer", ISS),
                ("reason", "unknown_kid"),
                ("result", "error")
            ]
        ),
        1.0
    );
    let r = get(s.proxy.admin, "/readyz", &[]).await;
    assert_eq!(r.status, 200, "still ready without the provider");
}

// ---------------------------------------------------------------------------
// 9. Metrics
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_validations_are_counted_by_issuer_and_result() {
    let s = Setup::start().await;
    let k = keys();
    let alice = jwt(&k.rsa_a, "RS256", "rsa-a", &claims("alice"));
    let victor = jwt(&k.ec, "ES256", "ec-1", &claims("victor"));
    let expired = jwt(
        &k.rsa_a,
        "RS256",
        "rsa-a",
        &claims_with("alice", json!({"exp": now() - 600})),
    );
    let wrong_aud = jwt(
        &k.ed,
        "EdDSA",
        "ed-1",
        &claims_with("alice", json!({"aud": "api://other"})),
    );
    let strict_es = jwt(
        &k.ec,
        "ES256",
        "ec-1",
        &claims_with("alice", json!({"iss": STRICT_ISS})),
    );
    let strict_ok = jwt(
        &k.rsa_a,
        "RS256",
        "rsa-a",
        &claims_with("alice", json!({"iss": STRICT_ISS})),
    );
    for (token, status) in [
        (&alice, 200),
        (&victor, 200),
        (&alice, 200),
        (&expired, 401),
        (&wrong_aud, 401),
        (&strict_es, 401),
        (&strict_ok, 200),
        (&"not-a-jwt".to_string(), 401),
    ] {
        assert_eq!(s.call("GET", "/v1/datasets", token).await.status, status);
    }
    let m = scrape(&s.proxy).await;
    let name = "portcullis_token_validations_total";
    let count =
        |issuer: &str, result: &str| metric(&m, name, &[("issuer", issuer), ("result", result)]);
    assert_eq!(count(ISS, "valid"), 2.0);
    assert_eq!(count(ISS, "invalid"), 2.0);
    assert_eq!(count(STRICT_ISS, "valid"), 1.0);
    assert_eq!(count(STRICT_ISS, "invalid"), 1.0);
    // Text that names no configured issuer is counted, under one fixed label.
    assert_eq!(count("unknown", "invalid"), 1.0);
    // The repeated token is counted once more, as valid or as a cache hit.
    assert_eq!(count(ISS, "valid") + count(ISS, "cached"), 3.0);
}

// ---------------------------------------------------------------------------
// 10, 11. check and explain
// ---------------------------------------------------------------------------

/// What one finished command printed.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary in `dir` to completion, killed after [`PATIENCE`].
fn cli(dir: &std::path::Path, args: &[&str]) -> Ran {
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portcullis");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("portcullis {args:?} did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ran {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// A workspace with the policy, an empty keys file and `portcullis.yaml` ending with `oauth`.
fn cli_workspace(oauth: &str) -> Workspace {
    let ws = Workspace::new();
    ws.write("policy.yaml", POLICY);
    ws.write("keys.yaml", &keys_yaml(&[]));
    ws.write_config("http://127.0.0.1:9", oauth);
    ws
}

#[test]
fn check_points_at_a_bad_issuer_entry() {
    // write_config puts five lines before `extra`: oauth is line 6.
    let good = format!(
        "oauth:\n  issuers:\n    - issuer: {ISS}\n      jwks_uri: http://127.0.0.1:9/jwks\n      audience: {AUD}\n"
    );
    let ws = cli_workspace(&good);
    let ran = cli(ws.dir.path(), &["check", "-c", "portcullis.yaml"]);
    assert_eq!(ran.code, Some(0), "{}\n{}", ran.stdout, ran.stderr);

    let no_audience = format!(
        "oauth:\n  issuers:\n    - issuer: {ISS}\n      jwks_uri: http://127.0.0.1:9/jwks\n    - issuer: {STRICT_ISS}\n      jwks_uri: http://127.0.0.1:9/jwks\n      audience: {AUD}\n      algorithms: [RS256, HS256]\n"
    );
    let ws = cli_workspace(&no_audience);
    let ran = cli(ws.dir.path(), &["check", "-c", "portcullis.yaml"]);
    assert_ne!(ran.code, Some(0), "check accepted: {}", ran.stdout);
    let text = format!("{}{}", ran.stdout, ran.stderr);
    // The issuer's value starts at column 15; HS256 inside the flow list at column 27.
    assert!(
        text.lines()
            .any(|l| l.contains("portcullis.yaml:8:15: ") && l.contains("audience")),
        "no portcullis.yaml:8:15 for the missing audience in:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("portcullis.yaml:13:27: ") && l.contains("HS256")),
        "no portcullis.yaml:13:27 for HS256 in:\n{text}"
    );

    let plain_http = format!(
        "oauth:\n  issuers:\n    - issuer: {ISS}\n      jwks_uri: http://idp.example.com/jwks\n      audience: {AUD}\n"
    );
    let ws = cli_workspace(&plain_http);
    let ran = cli(ws.dir.path(), &["check", "-c", "portcullis.yaml"]);
    assert_ne!(ran.code, Some(0), "check accepted http:// off loopback");
    let text = format!("{}{}", ran.stdout, ran.stderr);
    assert!(
        text.lines()
            .any(|l| l.contains("portcullis.yaml:9:17: ") && l.contains("jwks_uri")),
        "no portcullis.yaml:9:17 for the jwks_uri in:\n{text}"
    );
}

#[test]
fn explain_shows_what_a_token_or_a_scoped_principal_may_do() {
    let oauth = format!(
        "oauth:\n  issuers:\n    - issuer: {ISS}\n      jwks_uri: http://127.0.0.1:9/jwks\n      audience: {AUD}\n"
    );
    let ws = cli_workspace(&oauth);
    let k = keys();
    let token = jwt(
        &k.rsa_a,
        "RS256",
        "rsa-a",
        &claims_with(
            "alice",
            json!({"scope": "openid datasets:read", "azp": "tableau"}),
        ),
    );
    ws.write("token.jwt", &format!("{token}\n"));
    let explain = |args: &[&str]| {
        let mut all = vec!["explain", "-c", "portcullis.yaml"];
        all.extend_from_slice(args);
        let ran = cli(ws.dir.path(), &all);
        assert_eq!(ran.code, Some(0), "explain {args:?}: {}", ran.stderr);
        ran.stdout
    };

    let out = explain(&["--token-file", "token.jwt", "PUT", "/v1/datasets/ds_1"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("deny (forbidden)"), "{out}");
    assert_eq!(
        lines[1],
        format!("token: issuer \"{ISS}\", sub \"alice\", scopes [\"datasets:read\"], client \"tableau\" (signature and times not checked here)"),
        "{out}"
    );
    assert!(lines.contains(&"needs: datasets/ds_1:write"), "{out}");
    assert!(lines.iter().any(|l| l.starts_with("missing:")), "{out}");
    assert!(lines.contains(&"effective grants: datasets:read"), "{out}");
    assert!(
        !out.contains(token.split('.').nth(2).unwrap()),
        "explain printed the signature"
    );

    let out = explain(&["--token-file", "token.jwt", "GET", "/v1/datasets/ds_1"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("allow (granted)"), "{out}");
    assert!(lines.contains(&"allowed by: datasets:read"), "{out}");

    let out = explain(&[
        "--principal",
        "alice",
        "--scope",
        "datasets:read",
        "DELETE",
        "/v1/datasets/ds_1",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("deny (forbidden)"), "{out}");
    assert_eq!(
        lines[1],
        "principal: \"alice\" with scopes [\"datasets:read\"] (as a token would name them)",
        "{out}"
    );

    let out = explain(&["--principal", "alice", "DELETE", "/v1/datasets/ds_1"]);
    assert!(out.starts_with("allow (granted)"), "{out}");

    let out = explain(&["--principal", "mallory", "GET", "/v1/datasets"]);
    assert!(out.starts_with("deny (unknown_principal)"), "{out}");

    // A token from an issuer the config does not have: the proxy would refuse it.
    let foreign = jwt(
        &k.rsa_a,
        "RS256",
        "rsa-a",
        &claims_with("alice", json!({"iss": "https://evil.test/"})),
    );
    ws.write("foreign.jwt", &foreign);
    let out = explain(&["--token-file", "foreign.jwt", "GET", "/v1/datasets"]);
    assert!(
        out.contains("no issuer in the config has this iss"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------
// 12. Keys beside tokens
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_keep_working_beside_tokens() {
    let key = TestKey::new("victor");
    let s = Setup::start_with("", &[&key]).await;
    let k = keys();
    let r = get(
        s.proxy.addr,
        "/v1/datasets",
        &[("authorization", &bearer(&key.key))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s.backend.single();
    assert_eq!(seen.header("x-portcullis-credential"), Some("key"));
    assert_eq!(seen.header("x-portcullis-key-id"), Some(key.id.as_str()));
    assert_eq!(seen.header("x-portcullis-principal"), Some("victor"));

    // X-API-Key too, and a token next to it.
    let r = get(s.proxy.addr, "/v1/datasets", &[("x-api-key", &key.key)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = jwt(&k.rsa_a, "RS256", "rsa-a", &claims("alice"));
    assert_eq!(s.call("POST", "/v1/datasets", &token).await.status, 200);
    // A pcs_ Bearer is always a key: an unknown one is unknown_key, never a token.
    let stranger = TestKey::new("alice");
    let r = get(
        s.proxy.addr,
        "/v1/datasets",
        &[("authorization", &bearer(&stranger.key))],
    )
    .await;
    assert_problem(&r, 401, &[&stranger.key]);
    let d = wait_decisions(s.ws(), 4).await;
    let reasons: Vec<&str> = d.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["granted", "granted", "granted", "unknown_key"]);
    assert_eq!(d[0]["credential"], "key");
    assert_eq!(d[2]["credential"], "oauth");
    assert_eq!(s.backend.count(), 3);
}
