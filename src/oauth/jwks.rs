//! An issuer's JWK Set: fetched over the binary's own hyper/rustls client, parsed key by key
//! (a key type we cannot use is skipped, never the whole set), and kept as ready-to-use
//! verification keys.

use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Largest JWK Set accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Which keys can verify which algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// RS256/384/512, PS256/384/512.
    Rsa,
    /// ES256 (P-256).
    P256,
    /// ES384 (P-384).
    P384,
    /// EdDSA (Ed25519).
    Ed25519,
}

impl Family {
    /// The family an algorithm needs; `None` for HMAC, which never verifies with a published key.
    pub fn of(alg: Algorithm) -> Option<Family> {
        use Algorithm::*;
        match alg {
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Some(Family::Rsa),
            ES256 => Some(Family::P256),
            ES384 => Some(Family::P384),
            EdDSA => Some(Family::Ed25519),
            HS256 | HS384 | HS512 => None,
        }
    }
}

/// One usable public key.
pub struct PublicKey {
    /// `kid`.
    pub kid: Option<String>,
    /// `alg`, when the key names one: then only that algorithm may use it.
    pub alg: Option<Algorithm>,
    /// What it verifies.
    pub family: Family,
    /// The key.
    pub key: DecodingKey,
}

/// The usable keys of a JWK Set.
#[derive(Default)]
pub struct KeySet {
    /// In the order the set lists them.
    pub keys: Vec<PublicKey>,
}

impl KeySet {
    /// The key for a token's `kid` and `alg`: by `kid`, or without one the only key that fits.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&DecodingKey> {
        let family = Family::of(alg)?;
        let fits = |k: &&PublicKey| k.family == family && k.alg.is_none_or(|a| a == alg);
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(fits)
                .find(|k| k.kid.as_deref() == Some(kid))
                .map(|k| &k.key),
            None => {
                let mut candidates = self.keys.iter().filter(fits);
                match (candidates.next(), candidates.next()) {
                    (Some(only), None) => Some(&only.key),
                    _ => None,
                }
            }
        }
    }

    /// Parses a JWK Set document; keys that are not usable public keys are skipped.
    pub fn parse(body: &[u8]) -> Result<KeySet, String> {
        let doc: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("not a JWK Set (JSON): {e}"))?;
        let entries = doc["keys"]
            .as_array()
            .ok_or("not a JWK Set: no \"keys\" array")?;
        let keys = entries
            .iter()
            .filter_map(|entry| serde_json::from_value::<Jwk>(entry.clone()).ok())
            .filter_map(|jwk| public_key(&jwk))
            .collect();
        Ok(KeySet { keys })
    }
}

fn public_key(jwk: &Jwk) -> Option<PublicKey> {
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Family::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Family::P256,
            EllipticCurve::P384 => Family::P384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => Family::Ed25519,
            _ => return None,
        },
        // A symmetric key in a published set is never used: no HMAC with public keys.
        AlgorithmParameters::OctetKey(_) => return None,
    };
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(a) => Some(a.to_string().parse::<Algorithm>().ok()?),
    };
    if alg.is_some_and(|a| Family::of(a) != Some(family)) {
        return None;
    }
    Some(PublicKey {
        kid: jwk.common.key_id.clone(),
        alg,
        family,
        key: DecodingKey::from_jwk(jwk).ok()?,
    })
}

/// Fetches JWK Sets over HTTPS (or plain HTTP, for a provider on loopback).
pub struct Fetcher {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl Fetcher {
    /// A client trusting `ca`, or the system roots.
    pub fn new(ca: Option<&std::path::Path>) -> Result<Fetcher, String> {
        let tls = crate::tls::upstream_client_config(ca)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Fetcher {
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// GETs and parses the set, within `timeout`.
    pub async fn fetch(&self, uri: &Uri, timeout: Duration) -> Result<KeySet, String> {
        let work = async {
            let request = http::Request::get(uri.clone())
                .header(
                    http::header::ACCEPT,
                    "application/jwk-set+json, application/json",
                )
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("cannot fetch {uri}: {}", chain(&e)))?;
            if !response.status().is_success() {
                return Err(format!("{uri} answered {}", response.status()));
            }
            let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| format!("cannot read {uri}: {e}"))?
                .to_bytes();
            KeySet::parse(&body).map_err(|e| format!("{uri}: {e}"))
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| Err(format!("{uri} did not answer within {timeout:?}")))
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
