//! `portcullis explain`: the decision for one caller and one request, and why. The caller is a
//! key (`--key-id`), an OAuth token (`--token-file`, its claims read without checking the
//! signature), a principal with token scopes (`--principal`, `--scope`), or nobody (what a
//! request without a credential gets). The decision comes from the same judge the proxy uses.

use std::path::PathBuf;

use http::Method;

use super::{resolve_files, CommandError, FileArgs};
use crate::clock::unix_now;
use crate::decision::{self, Reason};
use crate::identity::{Caller, TokenCaller};
use crate::path;
use crate::policy::RouteRule;
use crate::reload::compile_once;
use crate::state::Snapshot;
use crate::store::KeysLocation;

/// Who `explain` asks for.
#[derive(Debug, Default)]
pub struct Who {
    /// A key by its public id.
    pub key_id: Option<String>,
    /// A file holding an access token (a JWT).
    pub token_file: Option<PathBuf>,
    /// A principal, as a token would name it.
    pub principal: Option<String>,
    /// Token scopes narrowing the principal.
    pub scopes: Vec<String>,
}

/// Prints the decision; exits 0 whether allowed or denied.
pub fn run(files: &FileArgs, who: &Who, method: &str, raw_path: &str) -> Result<(), CommandError> {
    let resolved = resolve_files(files)?;
    let backend = resolved.backend();
    let oauth = resolved.config.as_ref().and_then(|c| c.oauth.clone());
    let keys = match (&resolved.keys, &who.key_id) {
        (Some(k), _) => k.clone(),
        (None, Some(_)) => return Err(CommandError::Usage("explain --key-id needs --keys".into())),
        (None, None) => KeysLocation::File(empty_keys()?),
    };
    let (snapshot, _) =
        super::block_on(compile_once(&resolved.policy, &keys, &Default::default()))?
            .map_err(|(_, p)| CommandError::Usage(p.to_string()))?;
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|_| CommandError::Usage(format!("{method:?} is not an HTTP method")))?;
    let (path_only, _query) = raw_path.split_once('?').unwrap_or((raw_path, ""));
    let normalised = match path::normalise_for(path_only, &backend.reading) {
        Ok(p) => p,
        Err(e) => {
            println!("deny (bad_path): {raw_path:?} cannot be normalised: {e}");
            return Ok(());
        }
    };
    let token = token_caller(&snapshot, who, oauth.as_ref())?;
    let (identified, caller_line): (Result<Caller<'_>, Reason>, String) =
        match (&who.key_id, &token) {
            (Some(id), _) => {
                let key = snapshot.keys.by_id(id).ok_or_else(|| {
                    CommandError::Usage(format!(
                        "no usable key with id {}",
                        crate::keys::secret::shown_id(id)
                    ))
                })?;
                let line = format!(
                    "key: {} ({}***) of {} {}{}",
                    key.id(),
                    key.prefix(),
                    key.principal().kind.as_str(),
                    key.principal().name,
                    if key.scoped() {
                        ", narrowed by scopes"
                    } else {
                        ""
                    }
                );
                (
                    decision::usable(key.state(unix_now())).map(Caller::Key),
                    line,
                )
            }
            (None, Some((Ok(t), line))) => (Ok(Caller::Token(t)), line.clone()),
            (None, Some((Err(reason), line))) => (Err(*reason), line.clone()),
            (None, None) => (
                Err(Reason::NoCredential),
                "caller: none (a request without a credential)".to_string(),
            ),
        };
    let mut lines = explain(
        &snapshot,
        identified,
        &method,
        &normalised,
        &backend.reading,
    );
    lines.insert(1, caller_line);
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// An empty keys file for explaining without keys.
pub(crate) fn empty_keys() -> Result<PathBuf, CommandError> {
    let dir = std::env::temp_dir().join(format!("portcullis-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| CommandError::Usage(e.to_string()))?;
    let path = dir.join("keys.yaml");
    std::fs::write(&path, "version: 1\nkeys: []\n")
        .map_err(|e| CommandError::Usage(e.to_string()))?;
    Ok(path)
}

type TokenLine = (Result<TokenCaller, Reason>, String);

/// The caller a token file or a principal with scopes stands for.
fn token_caller(
    snapshot: &Snapshot,
    who: &Who,
    oauth: Option<&crate::oauth::OAuthConfig>,
) -> Result<Option<TokenLine>, CommandError> {
    if let Some(file) = &who.token_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| CommandError::Usage(format!("{}: {e}", file.display())))?;
        let claims = crate::oauth::unverified_claims(&text).ok_or_else(|| {
            CommandError::Usage(format!("{}: not a JWT access token", file.display()))
        })?;
        let iss = claims["iss"].as_str().unwrap_or("");
        let issuer = oauth.and_then(|o| o.issuers.iter().find(|i| i.issuer == iss));
        let claim = issuer.map_or("sub", |i| i.principal_claim.as_str());
        let principal = claims[claim].as_str().unwrap_or("").to_string();
        let scopes = crate::oauth::scopes_of(claims["scope"].as_str(), claims.get("scp"));
        let client = claims["azp"].as_str().or(claims["client_id"].as_str());
        let shown_client = client.map_or("none".to_string(), |c| format!("{c:?}"));
        let mut line = format!(
            "token: issuer {iss:?}, {claim} {principal:?}, scopes {scopes:?}, client {shown_client} (signature and times not checked here)"
        );
        if issuer.is_none() {
            line.push_str(
                "; no issuer in the config has this iss: the proxy would refuse it (invalid_token)",
            );
        }
        let caller = crate::oauth::caller_for(
            &snapshot.policy,
            &principal,
            &scopes,
            iss,
            client.map(Into::into),
        );
        return Ok(Some((caller, line)));
    }
    let Some(principal) = &who.principal else {
        return Ok(None);
    };
    let caller =
        crate::oauth::caller_for(&snapshot.policy, principal, &who.scopes, "explain", None);
    let line = format!(
        "principal: {principal:?} with scopes {:?} (as a token would name them)",
        who.scopes
    );
    Ok(Some((caller, line)))
}

fn explain(
    snapshot: &Snapshot,
    identified: Result<Caller<'_>, Reason>,
    method: &Method,
    path: &str,
    reading: &crate::path::BackendReading,
) -> Vec<String> {
    let decision = decision::judge(snapshot, method, path, reading, identified);
    let policy = &snapshot.policy;
    let verdict = if decision.reason.allows() {
        "allow"
    } else {
        "deny"
    };
    let status = match decision.reason {
        r if r.allows() => "the backend answers".to_string(),
        Reason::BadPath | Reason::BadRequest | Reason::MethodOverride | Reason::BodyNotAllowed => {
            "400".into()
        }
        r if r.is_unauthenticated() => "401 with WWW-Authenticate".into(),
        _ => "deny_status (403 unless configured 401)".into(),
    };
    let mut lines = vec![format!(
        "{verdict} ({}): {status}",
        decision.reason.as_str()
    )];
    match decision.route {
        None => lines.push(format!(
            "route: none matches {method} {path} (default deny)"
        )),
        Some(route) => lines.push(format!(
            "route: {} (policy line {}){}",
            route.matcher,
            route.line,
            if matches!(route.rule, RouteRule::Public) {
                ", public: no credential needed"
            } else {
                ""
            }
        )),
    }
    if let Some(other) = decision.alternate {
        lines.push(format!(
            "but: the backend may read this path as {} (policy line {}), which this caller may not use (see backend: in the README)",
            other.matcher, other.line
        ));
    }
    if let Some(RouteRule::Protected {
        resource, access, ..
    }) = decision.route.map(|r| &r.rule)
    {
        let name = policy.resource_name(*resource);
        let needed = match decision.instance {
            Some(i) => format!("{name}/{i}:{access}"),
            None => format!("{name}:{access}"),
        };
        lines.push(format!("needs: {needed}"));
        // `access` is set only once the caller was known and its grants were consulted.
        match (decision.access, decision.grant) {
            (_, Some(g)) => lines.push(format!("allowed by: {}", policy.display_grant(g))),
            (Some(_), None) if decision.reason == Reason::Forbidden => {
                lines.push(format!("missing: no grant of this caller covers {needed}"))
            }
            _ => {}
        }
    }
    if let (
        Some(route),
        Some(RouteRule::Protected {
            resource, access, ..
        }),
    ) = (decision.route, decision.route.map(|r| &r.rule))
    {
        if let Some(filter) = &route.filter {
            let name = policy.resource_name(*resource);
            let mut line = format!(
                "filter: the answer's list at {:?} is filtered by each item's {:?}",
                filter.items.as_str(),
                filter.instance.as_str()
            );
            if decision.reason.allows() {
                if decision.filter {
                    let passing: Vec<String> = decision
                        .caller
                        .map(|c| c.grants())
                        .unwrap_or_default()
                        .iter()
                        .filter(|g| g.access >= *access)
                        .filter(|g| g.resource.is_none_or(|r| r == *resource))
                        .filter_map(|g| g.instance.as_deref().map(|i| format!("{name}/{i}")))
                        .collect();
                    line.push_str(&format!(
                        "; this caller sees only the items of {}",
                        passing.join(", ")
                    ));
                } else {
                    line.push_str(
                        "; this caller's grant covers all of it: the answer passes unchanged",
                    );
                }
            }
            lines.push(line);
        }
    }
    if let Some(caller) = decision.caller {
        let grants: Vec<String> = caller
            .grants()
            .iter()
            .map(|g| policy.display_grant(g))
            .collect();
        lines.push(format!("effective grants: {}", grants.join(", ")));
    }
    lines
}
