//! Who may do what with keys: pure rules, no I/O.
//!
//! Key management is authorised with grants on the `api_keys` resource, the instance being the
//! principal whose keys are touched: `api_keys:read` lists one's own keys, `api_keys:write`
//! creates, rotates, (de)activates and revokes them, `api_keys:manage` does all of it for any
//! principal (`api_keys/NAME:manage` for one principal only). A new key never exceeds the key
//! that makes it nor the principal it is for.

use crate::keys::Key;
use crate::policy::grant::{self, Access, Grant};
use crate::policy::{Policy, Principal, API_KEYS_RESOURCE};

/// Why a key-management request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The caller's grants do not cover the action.
    #[error("this key needs api_keys:{needed} for {whose} keys")]
    NotAllowed {
        /// The level that was missing.
        needed: Access,
        /// `own` or `other principals'`.
        whose: &'static str,
    },
    /// The requested scopes name something the policy does not know or are malformed.
    #[error("{0}")]
    BadScope(String),
    /// The new key would be able to do more than the caller's key.
    #[error("the new key would exceed the access of the key creating it ({0})")]
    ExceedsCaller(String),
    /// The requested scopes go beyond the target principal's grants.
    #[error("the requested scopes exceed the grants of principal {principal:?} ({grant})")]
    ExceedsTarget {
        /// Target principal.
        principal: String,
        /// The first offending grant.
        grant: String,
    },
}

/// Whether `caller` may act at `level` on the keys of `target`.
pub fn may(policy: &Policy, caller: Key<'_>, target: &str, level: Access) -> Result<(), Refused> {
    let Some(resource) = policy.resource_id(API_KEYS_RESOURCE) else {
        return Err(Refused::NotAllowed {
            needed: level,
            whose: "any",
        });
    };
    let own = *caller.principal().name == *target;
    let needed = if own { level } else { Access::Manage };
    match grant::any_allows(caller.grants(), resource, Some(target), needed) {
        Some(_) => Ok(()),
        None => Err(Refused::NotAllowed {
            needed,
            whose: if own { "own" } else { "other principals'" },
        }),
    }
}

/// Whether the caller may see every principal's keys (list without a filter).
pub fn may_list_all(policy: &Policy, caller: Key<'_>) -> bool {
    policy
        .resource_id(API_KEYS_RESOURCE)
        .is_some_and(|r| grant::any_allows(caller.grants(), r, None, Access::Manage).is_some())
}

/// The scopes a new key gets, after the no-escalation checks. `None` means "no scopes": the key
/// has exactly its principal's access. Without requested scopes, a key for the caller's own
/// principal inherits the caller key's scopes, so a read-only key only mints read-only keys.
pub fn scopes_for_new_key(
    policy: &Policy,
    caller: Key<'_>,
    caller_scopes: Option<&[String]>,
    target: &Principal,
    requested: Option<&[String]>,
) -> Result<Option<Vec<String>>, Refused> {
    let own = *caller.principal().name == *target.name;
    let scopes: Option<Vec<String>> = match requested {
        Some(list) => Some(list.to_vec()),
        None if own => caller_scopes.map(<[String]>::to_vec),
        None => None,
    };
    let effective: Vec<Grant> = match &scopes {
        None => target.grants.to_vec(),
        Some(list) => {
            let mut compiled = Vec::with_capacity(list.len());
            for text in list {
                let g = policy.compile_grant(text).map_err(Refused::BadScope)?;
                if requested.is_some()
                    && !grant::set_within(std::slice::from_ref(&g), &target.grants)
                {
                    return Err(Refused::ExceedsTarget {
                        principal: target.name.to_string(),
                        grant: text.clone(),
                    });
                }
                compiled.push(g);
            }
            grant::intersect_sets(&target.grants, &compiled)
        }
    };
    within_caller(policy, caller, &effective)?;
    Ok(scopes)
}

/// Refuses when `effective` allows anything the caller's key does not.
pub fn within_caller(policy: &Policy, caller: Key<'_>, effective: &[Grant]) -> Result<(), Refused> {
    match effective
        .iter()
        .find(|g| !grant::set_within(std::slice::from_ref(*g), caller.grants()))
    {
        None => Ok(()),
        Some(g) => Err(Refused::ExceedsCaller(policy.display_grant(g))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::keys::secret;
    use crate::state::Snapshot;

    const POLICY: &str = r#"
version: 1
routes:
  - match: GET /v1/datasets
    resource: datasets
    access: read
  - match: POST /v1/datasets
    resource: datasets
    access: write
roles:
  viewer: ["*:read", "api_keys:write"]
  locked: ["*:read"]
  admin: ["*:*", "api_keys:manage"]
principals:
  vera: { kind: user, roles: [viewer] }
  lou: { kind: user, roles: [locked] }
  ada: { kind: user, roles: [admin] }
  bot: { kind: robot, grants: ["datasets:write"] }
  helper: { kind: user, grants: ["datasets:read", "api_keys/bot:manage"] }
"#;

    fn snapshot() -> Snapshot {
        let mut keys = String::from("version: 1\nkeys:\n");
        for (id, principal, scopes) in [
            ("vera", "vera", ""),
            ("lou", "lou", ""),
            ("ada", "ada", ""),
            ("adaro", "ada", "    scopes: ['*:read', 'api_keys:write']\n"),
            ("helper", "helper", ""),
        ] {
            keys.push_str(&format!(
                "  - id: {id}\n    prefix: x\n    hash: {}\n    principal: {principal}\n{scopes}",
                secret::hash_text(id)
            ));
        }
        Snapshot::compile(POLICY, &keys, 1, &Default::default())
            .unwrap()
            .0
    }

    fn key<'s>(s: &'s Snapshot, id: &str) -> Key<'s> {
        s.keys.by_id(id).unwrap()
    }

    #[test]
    fn own_keys_need_the_level_others_need_manage() {
        let s = snapshot();
        let p = &s.policy;
        assert!(may(p, key(&s, "vera"), "vera", Access::Write).is_ok());
        assert!(may(p, key(&s, "vera"), "vera", Access::Read).is_ok());
        assert!(
            may(p, key(&s, "lou"), "lou", Access::Read).is_err(),
            "* never covers api_keys, not even one's own listing"
        );
        assert!(may(p, key(&s, "lou"), "lou", Access::Write).is_err());
        assert!(may(p, key(&s, "vera"), "ada", Access::Read).is_err());
        assert!(may(p, key(&s, "ada"), "vera", Access::Write).is_ok());
        assert!(may(p, key(&s, "helper"), "bot", Access::Write).is_ok());
        assert!(may(p, key(&s, "helper"), "vera", Access::Write).is_err());
        assert!(may_list_all(p, key(&s, "ada")));
        assert!(!may_list_all(p, key(&s, "helper")));
    }

    #[test]
    fn no_escalation() {
        let s = snapshot();
        let p = &s.policy;
        let vera = p.principal("vera").unwrap();
        let ada = p.principal("ada").unwrap();
        let bot = p.principal("bot").unwrap();
        let w = |g: &str| vec![g.to_string()];
        // A viewer cannot ask for write.
        let err = scopes_for_new_key(p, key(&s, "vera"), None, vera, Some(&w("datasets:write")))
            .unwrap_err();
        assert!(matches!(err, Refused::ExceedsTarget { .. }), "{err:?}");
        // A read-only key of an admin cannot mint a write key, even though ada may write.
        let ro: Vec<String> = vec!["*:read".into(), "api_keys:write".into()];
        let err = scopes_for_new_key(
            p,
            key(&s, "adaro"),
            Some(&ro),
            ada,
            Some(&w("datasets:write")),
        )
        .unwrap_err();
        assert!(matches!(err, Refused::ExceedsCaller(_)), "{err:?}");
        // ...and without scopes it inherits its own read-only scopes.
        let inherited = scopes_for_new_key(p, key(&s, "adaro"), Some(&ro), ada, None).unwrap();
        assert_eq!(inherited, Some(ro.clone()));
        // An admin creates a key for another principal at that principal's level.
        assert_eq!(
            scopes_for_new_key(p, key(&s, "ada"), None, bot, None).unwrap(),
            None
        );
        // A helper who may manage the bot's keys but cannot write datasets cannot mint the bot a full key.
        let err = scopes_for_new_key(p, key(&s, "helper"), None, bot, None).unwrap_err();
        assert!(matches!(err, Refused::ExceedsCaller(_)));
        // ...but can mint it a read-only one.
        assert!(
            scopes_for_new_key(p, key(&s, "helper"), None, bot, Some(&w("datasets:read"))).is_ok()
        );
        let err =
            scopes_for_new_key(p, key(&s, "ada"), None, bot, Some(&w("nope:read"))).unwrap_err();
        assert!(matches!(err, Refused::BadScope(_)));
    }
}
