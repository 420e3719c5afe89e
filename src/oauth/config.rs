//! `oauth:` in `portcullis.yaml`, read with positions so `check` points at the bad field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use marked_yaml::Spanned;
use serde::Deserialize;

use crate::diagnostic::Problem;

/// One identity provider whose access tokens are accepted.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// Must equal the token's `iss`.
    pub issuer: String,
    /// The provider's JWK Set.
    pub jwks_uri: http::Uri,
    /// The token's `aud` must contain it.
    pub audience: String,
    /// The claim naming a policy principal (default `sub`).
    pub principal_claim: String,
    /// Algorithms accepted (default RS256, PS256, ES256, EdDSA); never `none` or HMAC.
    pub algorithms: Vec<Algorithm>,
    /// Trust for an https `jwks_uri` (default: the system roots).
    pub ca: Option<PathBuf>,
}

/// The validated `oauth:` block.
#[derive(Debug, Clone)]
pub struct OAuthConfig {
    /// The issuers, in file order.
    pub issuers: Vec<IssuerConfig>,
    /// How often each JWK Set is refreshed in the background (at most 10 minutes).
    pub refresh_interval: Duration,
    /// Validated tokens kept (by hash) until they expire.
    pub cache_size: usize,
}

#[derive(Deserialize)]
struct Whole {
    #[serde(default)]
    oauth: Option<OAuthFile>,
}

#[derive(schemars::JsonSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OAuthFile {
    issuers: Vec<IssuerFile>,
    #[schemars(with = "Option<String>")]
    refresh_interval: Option<Spanned<String>>,
    #[schemars(with = "Option<usize>")]
    cache_size: Option<Spanned<usize>>,
}

#[derive(schemars::JsonSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IssuerFile {
    #[schemars(with = "String")]
    issuer: Spanned<String>,
    #[schemars(with = "String")]
    jwks_uri: Spanned<String>,
    #[schemars(with = "Option<String>")]
    audience: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    principal_claim: Option<Spanned<String>>,
    #[schemars(with = "Option<Vec<String>>")]
    algorithms: Option<Vec<Spanned<String>>>,
    #[schemars(with = "Option<String>")]
    ca: Option<Spanned<String>>,
}

/// The algorithms accepted when an issuer lists none.
pub const DEFAULT_ALGORITHMS: [Algorithm; 4] = [
    Algorithm::RS256,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

/// Reads `oauth:` from the config text (`None` when absent); problems carry line and column.
pub fn parse(source: &str, base: &Path) -> Result<Option<OAuthConfig>, Vec<Problem>> {
    let whole: Whole = marked_yaml::from_yaml(0, source)
        .map_err(|e| vec![crate::diagnostic::from_marked_yaml(&e)])?;
    let Some(file) = whole.oauth else {
        return Ok(None);
    };
    let mut problems = Vec::new();
    let mut issuers = Vec::new();
    for spec in &file.issuers {
        if let Some(issuer) = issuer(spec, base, &mut problems) {
            if issuers
                .iter()
                .any(|i: &IssuerConfig| i.issuer == issuer.issuer)
            {
                problems.push(Problem::at_span(
                    spec.issuer.span(),
                    format!("issuer {:?} is listed twice", issuer.issuer),
                ));
            }
            issuers.push(issuer);
        }
    }
    if file.issuers.is_empty() {
        problems.push(Problem::at(1, 1, "oauth.issuers: list at least one issuer"));
    }
    let mut refresh_interval = Duration::from_secs(300);
    if let Some(text) = &file.refresh_interval {
        match humantime::parse_duration(text) {
            Ok(d) if d >= Duration::from_secs(10) && d <= Duration::from_secs(600) => {
                refresh_interval = d
            }
            _ => problems.push(Problem::at_span(
                text.span(),
                format!(
                    "oauth.refresh_interval: {:?} must be a duration from 10s to 10m",
                    text.as_str()
                ),
            )),
        }
    }
    let cache_size = match &file.cache_size {
        Some(n) if **n == 0 => {
            problems.push(Problem::at_span(
                n.span(),
                "oauth.cache_size: must be at least 1",
            ));
            1
        }
        Some(n) => **n,
        None => 10_000,
    };
    if problems.is_empty() {
        Ok(Some(OAuthConfig {
            issuers,
            refresh_interval,
            cache_size,
        }))
    } else {
        Err(problems)
    }
}

fn issuer(spec: &IssuerFile, base: &Path, problems: &mut Vec<Problem>) -> Option<IssuerConfig> {
    let before = problems.len();
    let mut at =
        |span: &marked_yaml::Span, message: String| problems.push(Problem::at_span(span, message));
    if spec.issuer.trim().is_empty() {
        at(
            spec.issuer.span(),
            "oauth issuer: the issuer must not be empty".into(),
        );
    }
    let jwks_uri = match spec.jwks_uri.parse::<http::Uri>() {
        Ok(uri) if acceptable_jwks_uri(&uri) => Some(uri),
        Ok(_) => {
            at(
                spec.jwks_uri.span(),
                format!(
                    "jwks_uri {:?} must be https:// (http:// only on loopback)",
                    spec.jwks_uri.as_str()
                ),
            );
            None
        }
        Err(e) => {
            at(
                spec.jwks_uri.span(),
                format!("jwks_uri {:?} is not a URL ({e})", spec.jwks_uri.as_str()),
            );
            None
        }
    };
    let audience = match &spec.audience {
        Some(a) if !a.trim().is_empty() => a.to_string(),
        Some(a) => {
            at(a.span(), "audience must not be empty".into());
            String::new()
        }
        None => {
            at(
                spec.issuer.span(),
                format!(
                    "issuer {:?} needs an audience: the tokens' aud must name this API",
                    spec.issuer.as_str()
                ),
            );
            String::new()
        }
    };
    let mut algorithms = Vec::new();
    for name in spec.algorithms.iter().flatten() {
        match name.parse::<Algorithm>() {
            Ok(a) if jwks_family(a) => algorithms.push(a),
            Ok(_) => at(
                name.span(),
                format!("algorithm {:?}: HMAC cannot be verified with published keys", name.as_str()),
            ),
            Err(_) => at(
                name.span(),
                format!("unknown algorithm {:?} (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)", name.as_str()),
            ),
        }
    }
    if spec.algorithms.as_ref().is_some_and(Vec::is_empty) {
        at(
            spec.issuer.span(),
            "algorithms: list at least one, or leave it out for the defaults".into(),
        );
    }
    if algorithms.is_empty() {
        algorithms = DEFAULT_ALGORITHMS.to_vec();
    }
    let principal_claim = spec
        .principal_claim
        .as_ref()
        .map_or_else(|| "sub".to_string(), |c| c.to_string());
    if problems.len() > before {
        return None;
    }
    Some(IssuerConfig {
        issuer: spec.issuer.to_string(),
        jwks_uri: jwks_uri?,
        audience,
        principal_claim,
        algorithms,
        ca: spec.ca.as_ref().map(|c| base.join(c.as_str())),
    })
}

fn jwks_family(alg: Algorithm) -> bool {
    super::jwks::Family::of(alg).is_some()
}

/// https anywhere; plain http only to a loopback address (a provider in the same pod, the demo).
fn acceptable_jwks_uri(uri: &http::Uri) -> bool {
    match (uri.scheme_str(), uri.host()) {
        (Some("https"), Some(_)) => true,
        (Some("http"), Some(host)) => {
            host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_bad_issuer_entry_is_reported_where_it_is() {
        let text = "upstream: http://x\noauth:\n  issuers:\n    - issuer: https://idp/\n      jwks_uri: http://idp.example/jwks\n      audience: api\n      algorithms: [RS256, HS256, none]\n";
        let problems = parse(text, Path::new("/")).unwrap_err();
        let lines: Vec<(usize, &str)> = problems
            .iter()
            .map(|p| (p.line, p.message.as_str()))
            .collect();
        assert_eq!(problems.len(), 3, "{lines:?}");
        assert!(
            lines.iter().any(|(l, m)| *l == 5 && m.contains("https")),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|(l, m)| *l == 7 && m.contains("HMAC")),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|(l, m)| *l == 7 && m.contains("unknown algorithm")),
            "{lines:?}"
        );
        let missing = "upstream: http://x\noauth:\n  issuers:\n    - issuer: https://idp/\n      jwks_uri: https://idp/jwks\n";
        let problems = parse(missing, Path::new("/")).unwrap_err();
        assert!(problems[0].message.contains("audience"), "{problems:?}");
        let typo = "upstream: http://x\noauth:\n  issuers:\n    - issuer: a\n      jwks_uri: https://idp/jwks\n      audience: x\n      audiense: y\n";
        assert!(parse(typo, Path::new("/")).unwrap_err()[0].line >= 4);
    }

    #[test]
    fn defaults() {
        let text = "upstream: http://x\noauth:\n  issuers:\n    - issuer: https://idp/\n      jwks_uri: http://127.0.0.1:9/jwks\n      audience: api\n";
        let c = parse(text, Path::new("/etc")).unwrap().unwrap();
        assert_eq!(c.issuers[0].principal_claim, "sub");
        assert_eq!(c.issuers[0].algorithms, DEFAULT_ALGORITHMS.to_vec());
        assert_eq!(c.refresh_interval, Duration::from_secs(300));
        assert!(parse("upstream: http://x\n", Path::new("/"))
            .unwrap()
            .is_none());
    }
}
