//! OAuth 2.0 access tokens (JWT, RFC 9068): validated at the proxy against each issuer's JWK
//! Set, mapped to a policy principal, and narrowed by the token's grant-shaped scopes exactly as
//! a key's scopes narrow it.
//!
//! A token is valid when its `alg` is one the issuer allows (never `none`, never HMAC: published
//! keys cannot make HMAC safe), its signature verifies with the issuer's key named by `kid`,
//! `iss` is the issuer, `aud` contains the audience, and `exp` (required) and `nbf` hold within
//! 60 s of clock skew. A validated token is cached by its SHA-256 until it expires, so a busy
//! client costs one signature check per token, not per request; the cache is bounded.
//!
//! The request path never waits on a provider, with one exception: a token whose `kid` the set
//! does not have triggers one refresh (at most one per 30 s per issuer, 2 s timeout), so a
//! signing-key rotation works at once while forged `kid`s cannot flood the provider. The set is
//! otherwise refreshed in the background; the last good set stays in use while the provider is
//! down.

pub mod config;
pub mod jwks;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use prometheus::{IntCounterVec, Opts, Registry};
use sha2::{Digest, Sha256};

use crate::decision::Reason;
use crate::identity::TokenCaller;
use crate::policy::grant;
use crate::state::Snapshot;
pub use config::{IssuerConfig, OAuthConfig};
use jwks::{Fetcher, KeySet};

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 60;
/// At most one refresh for an unknown `kid` per issuer in this window.
pub const UNKNOWN_KID_REFRESH: i64 = 30;
/// How long a request may wait for that refresh.
const KID_REFRESH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a background refresh may take.
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(10);

/// Token validations and JWK Set refreshes, by issuer.
#[derive(Clone)]
pub struct OAuthMetrics {
    validations: IntCounterVec,
    refreshes: IntCounterVec,
}

impl OAuthMetrics {
    /// Registers `portcullis_token_validations_total{issuer,result}` and
    /// `portcullis_jwks_refreshes_total{issuer,result}`.
    pub fn register(registry: &Registry) -> prometheus::Result<OAuthMetrics> {
        let validations = IntCounterVec::new(
            Opts::new(
                "portcullis_token_validations_total",
                "OAuth access tokens checked, by issuer and result (valid, cached, invalid, unknown_principal).",
            ),
            &["issuer", "result"],
        )?;
        let refreshes = IntCounterVec::new(
            Opts::new(
                "portcullis_jwks_refreshes_total",
                "JWK Set fetches, by issuer and result (ok, error; unknown_kid and background in reason).",
            ),
            &["issuer", "result", "reason"],
        )?;
        registry.register(Box::new(validations.clone()))?;
        registry.register(Box::new(refreshes.clone()))?;
        Ok(OAuthMetrics {
            validations,
            refreshes,
        })
    }

    fn validated(&self, issuer: &str, result: &str) {
        self.validations.with_label_values(&[issuer, result]).inc();
    }
}

/// One issuer and its current keys.
struct Issuer {
    config: IssuerConfig,
    keys: ArcSwap<KeySet>,
    fetcher: Fetcher,
    last_kid_refresh: AtomicI64,
    refreshing: tokio::sync::Mutex<()>,
}

/// What a verified token says, kept until it expires.
pub struct Verified {
    issuer: usize,
    kid: Option<String>,
    alg: Algorithm,
    /// The value of the issuer's `principal_claim`.
    pub principal: String,
    scopes: Vec<String>,
    client_id: Option<Arc<str>>,
    exp: i64,
    nbf: Option<i64>,
    /// The caller as compiled against one policy generation.
    resolved: ArcSwapOption<(u64, Result<Arc<TokenCaller>, Reason>)>,
}

/// Every configured issuer, and the validated-token cache.
pub struct OAuth {
    issuers: Vec<Arc<Issuer>>,
    cache: papaya::HashMap<[u8; 32], Arc<Verified>>,
    cache_size: usize,
    metrics: OAuthMetrics,
}

#[derive(serde::Deserialize)]
struct Claims {
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<serde_json::Value>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

impl OAuth {
    /// The issuers with the given key sets (issuer order; missing ones empty) and no fetch or
    /// background refresh yet: `start` builds on it; benchmarks and tests verify offline with it.
    pub fn with_sets(
        config: &OAuthConfig,
        metrics: OAuthMetrics,
        sets: Vec<KeySet>,
    ) -> Result<Arc<OAuth>, String> {
        let mut sets = sets.into_iter();
        let mut issuers = Vec::new();
        for c in &config.issuers {
            let fetcher = Fetcher::new(c.ca.as_deref())
                .map_err(|e| format!("oauth issuer {}: {e}", c.issuer))?;
            issuers.push(Arc::new(Issuer {
                config: c.clone(),
                keys: ArcSwap::from_pointee(sets.next().unwrap_or_default()),
                fetcher,
                last_kid_refresh: AtomicI64::new(i64::MIN / 2),
                refreshing: tokio::sync::Mutex::new(()),
            }));
        }
        Ok(Arc::new(OAuth {
            issuers,
            cache: papaya::HashMap::new(),
            cache_size: config.cache_size,
            metrics,
        }))
    }

    /// Starts every issuer: the first JWK Set fetch (a provider that is down is not fatal:
    /// its tokens are refused until a fetch succeeds) and the background refresh.
    pub async fn start(config: &OAuthConfig, metrics: OAuthMetrics) -> Result<Arc<OAuth>, String> {
        let oauth = OAuth::with_sets(config, metrics, Vec::new())?;
        for issuer in &oauth.issuers {
            if let Err(e) = oauth.refresh(issuer, BACKGROUND_TIMEOUT, "start").await {
                tracing::error!(issuer = %issuer.config.issuer, error = %e, "JWK Set unavailable; tokens of this issuer are refused until it loads");
            }
        }
        for issuer in oauth.issuers.clone() {
            let oauth = Arc::downgrade(&oauth);
            let interval = config.refresh_interval;
            tokio::spawn(async move {
                let mut wait = interval;
                loop {
                    tokio::time::sleep(wait).await;
                    let Some(oauth) = oauth.upgrade() else { return };
                    wait = match oauth
                        .refresh(&issuer, BACKGROUND_TIMEOUT, "background")
                        .await
                    {
                        Ok(()) => interval,
                        Err(e) => {
                            tracing::warn!(issuer = %issuer.config.issuer, error = %e, "JWK Set refresh failed; keeping the last good set");
                            interval.min(Duration::from_secs(30))
                        }
                    };
                }
            });
        }
        Ok(oauth)
    }

    async fn refresh(
        &self,
        issuer: &Issuer,
        timeout: Duration,
        reason: &str,
    ) -> Result<(), String> {
        let label = issuer.config.issuer.as_str();
        match issuer.fetcher.fetch(&issuer.config.jwks_uri, timeout).await {
            Ok(set) => {
                issuer.keys.store(Arc::new(set));
                self.metrics
                    .refreshes
                    .with_label_values(&[label, "ok", reason])
                    .inc();
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .refreshes
                    .with_label_values(&[label, "error", reason])
                    .inc();
                Err(e)
            }
        }
    }

    /// The caller a Bearer token stands for, or why it is refused.
    pub async fn identify(
        &self,
        token: &str,
        snapshot: &Snapshot,
        now: i64,
    ) -> Result<Arc<TokenCaller>, Reason> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self.cache.pin().get(&digest).cloned();
        let validated = match cached {
            Some(v) if holds(&v, now) && self.still_signed(&v) => {
                self.metrics
                    .validated(&self.issuers[v.issuer].config.issuer, "cached");
                v
            }
            _ => {
                let v = Arc::new(self.verify(token, now).await?);
                self.remember(digest, v.clone(), now);
                v
            }
        };
        let result = self.resolve(&validated, snapshot);
        if matches!(result, Err(Reason::UnknownPrincipal)) {
            self.metrics.validated(
                &self.issuers[validated.issuer].config.issuer,
                "unknown_principal",
            );
        }
        result
    }

    /// A cached token stays valid only while its issuer still publishes the key that signed
    /// it: a key retired from the JWK Set retires its tokens at the next request.
    fn still_signed(&self, v: &Verified) -> bool {
        self.issuers[v.issuer]
            .keys
            .load()
            .find(v.kid.as_deref(), v.alg)
            .is_some()
    }

    fn remember(&self, digest: [u8; 32], validated: Arc<Verified>, now: i64) {
        let cache = self.cache.pin();
        if cache.len() >= self.cache_size {
            cache.retain(|_, v| v.exp + LEEWAY_SECONDS as i64 > now);
            if cache.len() >= self.cache_size {
                cache.clear();
            }
        }
        cache.insert(digest, validated);
    }

    /// The token's caller against this snapshot's policy, compiled once per policy generation.
    fn resolve(&self, v: &Verified, snapshot: &Snapshot) -> Result<Arc<TokenCaller>, Reason> {
        if let Some(done) = v.resolved.load().as_ref() {
            if done.0 == snapshot.generation {
                return done.1.clone();
            }
        }
        let result = self.compile(v, snapshot);
        v.resolved
            .store(Some(Arc::new((snapshot.generation, result.clone()))));
        result
    }

    fn compile(&self, v: &Verified, snapshot: &Snapshot) -> Result<Arc<TokenCaller>, Reason> {
        caller_for(
            &snapshot.policy,
            &v.principal,
            &v.scopes,
            &self.issuers[v.issuer].config.issuer,
            v.client_id.clone(),
        )
        .map(Arc::new)
    }

    /// Checks the signature and every claim, without the cache; the one place a token becomes
    /// trusted.
    pub async fn verify(&self, token: &str, now: i64) -> Result<Verified, Reason> {
        let nobody = || {
            self.metrics.validated("unknown", "invalid");
            Reason::InvalidToken
        };
        let header = jsonwebtoken::decode_header(token).map_err(|_| nobody())?;
        let iss = unverified_issuer(token).ok_or_else(nobody)?;
        let (index, issuer) = self
            .issuers
            .iter()
            .enumerate()
            .find(|(_, i)| i.config.issuer == iss)
            .ok_or_else(nobody)?;
        let label = issuer.config.issuer.as_str();
        let invalid = || {
            self.metrics.validated(label, "invalid");
            Reason::InvalidToken
        };
        if !issuer.config.algorithms.contains(&header.alg) {
            return Err(invalid());
        }
        let key = match issuer.keys.load().find(header.kid.as_deref(), header.alg) {
            Some(key) => key.clone(),
            None => self
                .key_after_refresh(issuer, header.kid.as_deref(), header.alg, now)
                .await
                .ok_or_else(invalid)?,
        };
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer.config.issuer.as_str()]);
        validation.set_audience(&[issuer.config.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
            tracing::debug!(issuer = label, error = %e, "access token refused");
            invalid()
        })?;
        let claims = data.claims;
        let principal = match claims.rest.get(&issuer.config.principal_claim) {
            Some(serde_json::Value::String(p)) if !p.is_empty() => p.clone(),
            _ => return Err(invalid()),
        };
        self.metrics.validated(label, "valid");
        Ok(Verified {
            issuer: index,
            kid: header.kid.clone(),
            alg: header.alg,
            principal,
            scopes: scopes_of(claims.scope.as_deref(), claims.scp.as_ref()),
            client_id: claims.azp.or(claims.client_id).map(Into::into),
            exp: claims.exp,
            nbf: claims.nbf,
            resolved: ArcSwapOption::empty(),
        })
    }

    /// An unknown `kid`: one refresh per issuer per 30 s, waited for at most 2 s; requests that
    /// arrive meanwhile wait for the same refresh instead of starting their own.
    async fn key_after_refresh(
        &self,
        issuer: &Issuer,
        kid: Option<&str>,
        alg: Algorithm,
        now: i64,
    ) -> Option<jsonwebtoken::DecodingKey> {
        let _one_at_a_time = issuer.refreshing.lock().await;
        if let Some(key) = issuer.keys.load().find(kid, alg) {
            return Some(key.clone());
        }
        let last = issuer.last_kid_refresh.load(Ordering::SeqCst);
        if now - last < UNKNOWN_KID_REFRESH {
            self.metrics
                .refreshes
                .with_label_values(&[issuer.config.issuer.as_str(), "skipped", "unknown_kid"])
                .inc();
            return None;
        }
        issuer.last_kid_refresh.store(now, Ordering::SeqCst);
        if let Err(e) = self
            .refresh(issuer, KID_REFRESH_TIMEOUT, "unknown_kid")
            .await
        {
            tracing::warn!(issuer = %issuer.config.issuer, error = %e, "JWK Set refresh for an unknown kid failed");
        }
        issuer.keys.load().find(kid, alg).cloned()
    }
}

/// The caller a token's principal and scopes make against `policy`: the principal's grants,
/// narrowed by the grant-shaped scopes exactly as a key's scopes narrow it. `explain` uses it too.
pub fn caller_for(
    policy: &crate::policy::Policy,
    principal: &str,
    scopes: &[String],
    issuer: &str,
    client_id: Option<Arc<str>>,
) -> Result<TokenCaller, Reason> {
    let principal = policy
        .principal(principal)
        .ok_or(Reason::UnknownPrincipal)?
        .clone();
    let scopes: Vec<grant::Grant> = scopes
        .iter()
        .filter_map(|s| policy.compile_grant(s).ok())
        .collect();
    let grants: Arc<[grant::Grant]> = if scopes.is_empty() {
        principal.grants.clone()
    } else {
        grant::intersect_sets(&principal.grants, &scopes).into()
    };
    Ok(TokenCaller {
        principal,
        grants,
        scoped: !scopes.is_empty(),
        issuer: issuer.into(),
        client_id,
    })
}

/// A token's claims read without checking its signature: for `explain --token-file`, which
/// says so, never for a decision.
pub fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.trim().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether a cached token still holds at `now` (with the same skew as validation).
fn holds(v: &Verified, now: i64) -> bool {
    let leeway = LEEWAY_SECONDS as i64;
    now < v.exp + leeway && v.nbf.is_none_or(|nbf| now + leeway >= nbf)
}

/// `iss` from the payload, read before verification only to choose whose keys verify it.
fn unverified_issuer(token: &str) -> Option<String> {
    unverified_claims(token)?["iss"]
        .as_str()
        .map(str::to_string)
}

/// The token's scopes (`scope`, space-separated, or `scp`, an array or a string) that look like
/// grants (`resource[/instance]:access`); others belong to other APIs and are ignored.
pub fn scopes_of(scope: Option<&str>, scp: Option<&serde_json::Value>) -> Vec<String> {
    let mut all: Vec<String> = scope
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    match scp {
        Some(serde_json::Value::Array(items)) => {
            all.extend(items.iter().filter_map(|i| i.as_str().map(str::to_string)))
        }
        Some(serde_json::Value::String(s)) => all.extend(s.split_whitespace().map(str::to_string)),
        _ => {}
    }
    let mut seen = HashSet::new();
    all.into_iter()
        .filter(|s| grant::GrantSpec::parse(s).is_ok())
        .filter(|s| seen.insert(s.clone()))
        .collect()
}

/// Whether a Bearer value is a token rather than a portcullis key.
pub fn is_token(bearer: &str) -> bool {
    !bearer.starts_with(crate::keys::secret::KEY_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_grant_shaped_scopes_count() {
        let s = scopes_of(
            Some("openid profile datasets:read companies/acme:write"),
            Some(&serde_json::json!([
                "jobs:read",
                "offline_access",
                "datasets:read"
            ])),
        );
        assert_eq!(
            s,
            vec!["datasets:read", "companies/acme:write", "jobs:read"]
        );
        assert!(scopes_of(Some("openid email"), None).is_empty());
        assert_eq!(
            scopes_of(None, Some(&serde_json::json!("a:read b"))),
            vec!["a:read"]
        );
    }

    #[test]
    fn hmac_never_verifies_with_a_published_key() {
        assert!(jwks::Family::of(Algorithm::HS256).is_none());
        assert_eq!(jwks::Family::of(Algorithm::PS256), Some(jwks::Family::Rsa));
    }

    #[test]
    fn a_cached_token_expires_with_its_skew() {
        let v = Verified {
            issuer: 0,
            kid: None,
            alg: Algorithm::EdDSA,
            principal: "p".into(),
            scopes: vec![],
            client_id: None,
            exp: 1000,
            nbf: Some(500),
            resolved: ArcSwapOption::empty(),
        };
        assert!(holds(&v, 1059));
        assert!(!holds(&v, 1060));
        assert!(holds(&v, 440));
        assert!(!holds(&v, 439));
    }
}
