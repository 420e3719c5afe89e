//! `portcullis explain`: the decision for one key and one request, and why.

use http::Method;

use super::{resolve_files, CommandError, FileArgs};
use crate::decision::{self, Reason};
use crate::keys::Key;
use crate::path;
use crate::policy::RouteRule;
use crate::proxy::service::unix_now;
use crate::reload::compile_files;
use crate::state::Snapshot;

/// Prints the decision; exits 0 whether allowed or denied.
pub fn run(
    files: &FileArgs,
    key_id: &str,
    method: &str,
    raw_path: &str,
) -> Result<(), CommandError> {
    let (policy_path, keys_path, _) = resolve_files(files)?;
    let keys_path = keys_path.ok_or_else(|| CommandError::Usage("explain needs --keys".into()))?;
    let (snapshot, _) = compile_files(&policy_path, &keys_path, 1, &Default::default())
        .map_err(|(_, p)| CommandError::Usage(p.to_string()))?;
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|_| CommandError::Usage(format!("{method:?} is not an HTTP method")))?;
    let key = snapshot
        .keys
        .by_id(key_id)
        .ok_or_else(|| CommandError::Usage(format!("no usable key with id {key_id:?}")))?;
    let (path_only, _query) = raw_path.split_once('?').unwrap_or((raw_path, ""));
    let normalised = match path::normalise(path_only) {
        Ok(p) => p,
        Err(e) => {
            println!("deny (bad_path): {raw_path:?} cannot be normalised: {e}");
            return Ok(());
        }
    };
    for line in explain(&snapshot, key, &method, &normalised) {
        println!("{line}");
    }
    Ok(())
}

fn explain(snapshot: &Snapshot, key: Key<'_>, method: &Method, path: &str) -> Vec<String> {
    let now = unix_now();
    let state = if !key.active() {
        Some(Reason::InactiveKey)
    } else if key.expires().is_some_and(|e| now >= e) {
        Some(Reason::ExpiredKey)
    } else {
        None
    };
    let hit = snapshot
        .policy
        .lookup(method, crate::path::match_form(path));
    let mut reason = decision::Reason::NoRoute;
    let mut lines = Vec::new();
    let mut detail = Vec::new();
    let policy = &snapshot.policy;
    match &hit {
        None => detail.push(format!(
            "route: none matches {method} {path} (default deny)"
        )),
        Some(h) => {
            detail.push(format!(
                "route: {} (policy line {})",
                h.route.matcher, h.route.line
            ));
            match &h.route.rule {
                RouteRule::Public => reason = Reason::Public,
                RouteRule::Protected {
                    resource, access, ..
                } => {
                    let name = policy.resource_name(*resource);
                    let needed = match h.instance {
                        Some(i) => format!("{name}/{i}:{access}"),
                        None => format!("{name}:{access}"),
                    };
                    detail.push(format!("needs: {needed}"));
                    match crate::policy::grant::any_allows(
                        key.grants(),
                        *resource,
                        h.instance,
                        *access,
                    ) {
                        Some(g) => {
                            reason = Reason::Granted;
                            detail.push(format!("allowed by: {}", policy.display_grant(g)));
                        }
                        None => {
                            reason = Reason::Forbidden;
                            detail.push(format!("missing: no grant of this key covers {needed}"));
                        }
                    }
                }
            }
        }
    }
    if let (Some(s), false) = (state, reason == Reason::Public) {
        reason = s;
    }
    let verdict = if reason.allows() { "allow" } else { "deny" };
    lines.push(format!("{verdict} ({})", reason.as_str()));
    lines.push(format!(
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
    ));
    lines.extend(detail);
    let grants: Vec<String> = key
        .grants()
        .iter()
        .map(|g| policy.display_grant(g))
        .collect();
    lines.push(format!("effective grants: {}", grants.join(", ")));
    lines
}
