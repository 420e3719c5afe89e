//! `portcullis explain`: the decision for one key and one request, and why.

use http::Method;

use super::{resolve_files, CommandError, FileArgs};
use crate::clock::unix_now;
use crate::decision;
use crate::keys::Key;
use crate::path;
use crate::policy::RouteRule;
use crate::reload::compile_once;
use crate::state::Snapshot;

/// Prints the decision; exits 0 whether allowed or denied.
pub fn run(
    files: &FileArgs,
    key_id: &str,
    method: &str,
    raw_path: &str,
) -> Result<(), CommandError> {
    let resolved = resolve_files(files)?;
    let backend = resolved.backend();
    let policy_path = resolved.policy;
    let keys_path = resolved
        .keys
        .ok_or_else(|| CommandError::Usage("explain needs --keys".into()))?;
    let (snapshot, _) =
        super::block_on(compile_once(&policy_path, &keys_path, &Default::default()))?
            .map_err(|(_, p)| CommandError::Usage(p.to_string()))?;
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|_| CommandError::Usage(format!("{method:?} is not an HTTP method")))?;
    let key = snapshot.keys.by_id(key_id).ok_or_else(|| {
        CommandError::Usage(format!(
            "no usable key with id {}",
            crate::keys::secret::shown_id(key_id)
        ))
    })?;
    let (path_only, _query) = raw_path.split_once('?').unwrap_or((raw_path, ""));
    let normalised = match path::normalise_for(path_only, &backend.reading) {
        Ok(p) => p,
        Err(e) => {
            println!("deny (bad_path): {raw_path:?} cannot be normalised: {e}");
            return Ok(());
        }
    };
    for line in explain(&snapshot, key, &method, &normalised, &backend.reading) {
        println!("{line}");
    }
    Ok(())
}

fn explain(
    snapshot: &Snapshot,
    key: Key<'_>,
    method: &Method,
    path: &str,
    reading: &crate::path::BackendReading,
) -> Vec<String> {
    let decision = decision::judge(
        snapshot,
        method,
        path,
        reading,
        decision::usable(key.state(unix_now())),
    );
    let policy = &snapshot.policy;
    let verdict = if decision.reason.allows() {
        "allow"
    } else {
        "deny"
    };
    let mut lines = vec![
        format!("{verdict} ({})", decision.reason.as_str()),
        format!(
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
        ),
    ];
    match decision.route {
        None => lines.push(format!(
            "route: none matches {method} {path} (default deny)"
        )),
        Some(route) => lines.push(format!(
            "route: {} (policy line {})",
            route.matcher, route.line
        )),
    }
    if let Some(other) = decision.alternate {
        lines.push(format!(
            "but: the backend may read this path as {} (policy line {}), which this key may not use (see backend: in the README)",
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
        // `access` is set only once the key was usable and its grants were consulted.
        match (decision.access, decision.grant) {
            (_, Some(g)) => lines.push(format!("allowed by: {}", policy.display_grant(g))),
            (Some(_), None) if decision.reason == decision::Reason::Forbidden => {
                lines.push(format!("missing: no grant of this key covers {needed}"))
            }
            (Some(_), None) => {}
            (None, None) => {}
        }
    }
    let grants: Vec<String> = key
        .grants()
        .iter()
        .map(|g| policy.display_grant(g))
        .collect();
    lines.push(format!("effective grants: {}", grants.join(", ")));
    lines
}
