//! Grants and access levels: the pure algebra behind every decision.
//!
//! A grant is a box `resource × instance × access` where each side may be "any". A set of grants
//! is a union of boxes, so the intersection of two sets (a principal's grants and a key's scopes)
//! is the union of the pairwise intersections, which is what keys precompute at load time.

use std::fmt;

/// Index of a resource name in the policy's resource table.
pub type ResourceId = u32;

/// The id of `api_keys`, always the first resource a policy knows. `*` as the resource stands for
/// every resource but this one: who may make keys is granted only by name.
pub const API_KEYS: ResourceId = 0;

/// Whether a grant's resource (`None` for `*`) includes `resource`.
#[inline]
fn resource_includes(mine: Option<ResourceId>, resource: ResourceId) -> bool {
    match mine {
        None => resource != API_KEYS,
        Some(r) => r == resource,
    }
}

/// `read` < `write` < `manage`; a higher level includes the lower ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    /// Look at things.
    Read,
    /// Change things.
    Write,
    /// Administer things (matters for `api_keys`).
    Manage,
}

impl Access {
    /// Parses `read`, `write` or `manage`.
    pub fn parse(s: &str) -> Option<Access> {
        match s {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            "manage" => Some(Access::Manage),
            _ => None,
        }
    }

    /// The level's name as written in files.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Manage => "manage",
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A grant as written, before resource names are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantSpec {
    /// `None` for `*`.
    pub resource: Option<String>,
    /// `None` for "every instance" (no instance, or `*`).
    pub instance: Option<String>,
    /// `*` is `manage`, the highest level.
    pub access: Access,
}

/// Why a grant string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantSyntaxError {
    /// No `:access` part.
    #[error("grant {0:?} has no ':access' part (expected resource[/instance]:access)")]
    MissingAccess(String),
    /// Access not one of read/write/manage/*.
    #[error("grant {0:?} has unknown access {1:?} (expected read, write, manage or *)")]
    UnknownAccess(String, String),
    /// Empty resource or instance.
    #[error("grant {0:?} has an empty resource or instance")]
    Empty(String),
}

impl GrantSpec {
    /// Parses `resource[/instance]:access`, with `*` for any part.
    pub fn parse(text: &str) -> Result<GrantSpec, GrantSyntaxError> {
        let (target, access) = text
            .rsplit_once(':')
            .ok_or_else(|| GrantSyntaxError::MissingAccess(text.to_string()))?;
        let access = match access {
            "*" => Access::Manage,
            other => Access::parse(other).ok_or_else(|| {
                GrantSyntaxError::UnknownAccess(text.to_string(), other.to_string())
            })?,
        };
        let (resource, instance) = match target.split_once('/') {
            Some((r, i)) => (r, Some(i)),
            None => (target, None),
        };
        if resource.is_empty() || instance.is_some_and(str::is_empty) {
            return Err(GrantSyntaxError::Empty(text.to_string()));
        }
        Ok(GrantSpec {
            resource: (resource != "*").then(|| resource.to_string()),
            instance: instance.filter(|i| *i != "*").map(str::to_string),
            access,
        })
    }
}

/// A compiled grant: resource resolved to an id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Grant {
    /// `None` for every resource.
    pub resource: Option<ResourceId>,
    /// `None` for every instance.
    pub instance: Option<Box<str>>,
    /// The highest level granted.
    pub access: Access,
}

impl Grant {
    /// Whether this grant allows `access` on `resource` (and `instance`, when the route names one).
    #[inline]
    pub fn allows(&self, resource: ResourceId, instance: Option<&str>, access: Access) -> bool {
        self.access >= access
            && resource_includes(self.resource, resource)
            && match (&self.instance, instance) {
                (None, _) => true,
                (Some(mine), Some(asked)) => **mine == *asked,
                (Some(_), None) => false,
            }
    }

    /// Whether everything `other` allows, `self` allows too.
    pub fn covers(&self, other: &Grant) -> bool {
        self.access >= other.access
            && match other.resource {
                None => self.resource.is_none(),
                Some(r) => resource_includes(self.resource, r),
            }
            && (self.instance.is_none() || self.instance == other.instance)
    }

    /// The grant allowing exactly what both allow, if anything.
    pub fn intersect(&self, other: &Grant) -> Option<Grant> {
        let resource = match (self.resource, other.resource) {
            (None, None) => None,
            (None, Some(r)) | (Some(r), None) if r != API_KEYS => Some(r),
            (Some(a), Some(b)) if a == b => Some(a),
            _ => return None,
        };
        let instance = match (&self.instance, &other.instance) {
            (None, i) | (i, None) => i.clone(),
            (Some(a), Some(b)) if a == b => Some(a.clone()),
            _ => return None,
        };
        Some(Grant {
            resource,
            instance,
            access: self.access.min(other.access),
        })
    }
}

/// Whether any grant in the set allows the request.
#[inline]
pub fn any_allows<'g>(
    grants: &'g [Grant],
    resource: ResourceId,
    instance: Option<&str>,
    access: Access,
) -> Option<&'g Grant> {
    grants.iter().find(|g| g.allows(resource, instance, access))
}

/// A grant with `access` on some instance of `resource` (a filtered list admits it).
pub fn some_instance_allows(
    grants: &[Grant],
    resource: ResourceId,
    access: Access,
) -> Option<&Grant> {
    grants
        .iter()
        .find(|g| g.access >= access && resource_includes(g.resource, resource))
}

/// Whether `grants` allow `access` on the instance an answer's item names; the same test a
/// request path's instance gets.
pub fn item_allowed(
    grants: &[Grant],
    resource: ResourceId,
    instance: &str,
    access: Access,
) -> bool {
    any_allows(grants, resource, Some(instance), access).is_some()
}

/// The intersection of two grant sets, without grants another one already covers.
pub fn intersect_sets(a: &[Grant], b: &[Grant]) -> Vec<Grant> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            if let Some(g) = x.intersect(y) {
                out.push(g);
            }
        }
    }
    simplify(out)
}

/// Removes duplicates and grants covered by another grant in the set.
pub fn simplify(mut grants: Vec<Grant>) -> Vec<Grant> {
    grants.sort_by_key(|g| std::cmp::Reverse(g.access));
    let mut out: Vec<Grant> = Vec::with_capacity(grants.len());
    for g in grants {
        if !out.iter().any(|kept| kept.covers(&g)) {
            out.retain(|kept| !g.covers(kept));
            out.push(g);
        }
    }
    out
}

/// Whether every request `inner` allows is allowed by `outer` (used to refuse escalation).
pub fn set_within(inner: &[Grant], outer: &[Grant]) -> bool {
    inner.iter().all(|g| {
        // A box is inside a union of boxes here when one box covers it: the dimensions are
        // either "any" or a single value, so a box cannot be split across several others
        // unless it uses "any", which only a grant with "any" in that place covers.
        outer.iter().any(|o| o.covers(g))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn g(resource: Option<u32>, instance: Option<&str>, access: Access) -> Grant {
        Grant {
            resource,
            instance: instance.map(Into::into),
            access,
        }
    }

    #[test]
    fn parses_grant_forms() {
        let spec = GrantSpec::parse("datasets:read").unwrap();
        assert_eq!(spec.resource.as_deref(), Some("datasets"));
        assert_eq!(spec.instance, None);
        assert_eq!(spec.access, Access::Read);
        let spec = GrantSpec::parse("companies/acme:write").unwrap();
        assert_eq!(spec.instance.as_deref(), Some("acme"));
        let spec = GrantSpec::parse("*:*").unwrap();
        assert_eq!((spec.resource, spec.access), (None, Access::Manage));
        let spec = GrantSpec::parse("companies/*:read").unwrap();
        assert_eq!(spec.instance, None);
        assert!(GrantSpec::parse("datasets").is_err());
        assert!(GrantSpec::parse("datasets:delete").is_err());
        assert!(GrantSpec::parse(":read").is_err());
        assert!(GrantSpec::parse("companies/:read").is_err());
    }

    #[test]
    fn write_includes_read_and_instances_are_exact() {
        let write = g(Some(1), None, Access::Write);
        assert_ne!(API_KEYS, 1, "tests use 1.. for ordinary resources");
        assert!(write.allows(1, None, Access::Read));
        assert!(write.allows(1, Some("x"), Access::Write));
        assert!(!write.allows(1, None, Access::Manage));
        assert!(!write.allows(2, None, Access::Read));
        let acme = g(Some(1), Some("acme"), Access::Read);
        assert!(acme.allows(1, Some("acme"), Access::Read));
        assert!(!acme.allows(1, Some("acme2"), Access::Read));
        assert!(
            !acme.allows(1, None, Access::Read),
            "an instance grant does not allow lists"
        );
        assert!(g(None, None, Access::Read).allows(7, Some("z"), Access::Read));
    }

    #[test]
    fn intersection_never_exceeds_either_side() {
        let principal = vec![g(None, None, Access::Read), g(Some(1), None, Access::Write)];
        let scopes = vec![
            g(Some(1), None, Access::Manage),
            g(Some(2), Some("x"), Access::Read),
        ];
        let eff = intersect_sets(&principal, &scopes);
        assert!(any_allows(&eff, 1, None, Access::Write).is_some());
        assert!(any_allows(&eff, 1, None, Access::Manage).is_none());
        assert!(any_allows(&eff, 2, Some("x"), Access::Read).is_some());
        assert!(any_allows(&eff, 2, Some("y"), Access::Read).is_none());
        assert!(any_allows(&eff, 3, None, Access::Read).is_none());
        assert!(set_within(&eff, &principal));
        assert!(set_within(&eff, &scopes));
    }

    #[test]
    fn the_wildcard_resource_never_includes_api_keys() {
        let everything = g(None, None, Access::Manage);
        assert!(everything.allows(1, None, Access::Manage));
        assert!(!everything.allows(API_KEYS, None, Access::Read));
        assert!(!everything.allows(API_KEYS, Some("alice"), Access::Read));
        let keys = g(Some(API_KEYS), None, Access::Write);
        assert!(!everything.covers(&keys));
        assert!(everything.intersect(&keys).is_none());
        assert!(keys.intersect(&everything).is_none());
        assert_eq!(
            keys.intersect(&g(Some(API_KEYS), Some("a"), Access::Manage)),
            Some(g(Some(API_KEYS), Some("a"), Access::Write))
        );
        assert!(!set_within(
            std::slice::from_ref(&keys),
            std::slice::from_ref(&everything)
        ));
        let both = vec![everything, keys];
        assert_eq!(simplify(both.clone()).len(), 2);
        assert!(any_allows(&both, API_KEYS, Some("x"), Access::Write).is_some());
    }

    #[test]
    fn simplify_drops_covered_grants() {
        let out = simplify(vec![
            g(Some(1), Some("a"), Access::Read),
            g(Some(1), None, Access::Write),
            g(Some(1), None, Access::Write),
            g(Some(2), None, Access::Read),
        ]);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn set_within_detects_escalation() {
        let read_only = vec![g(None, None, Access::Read)];
        assert!(!set_within(&[g(Some(1), None, Access::Write)], &read_only));
        assert!(set_within(
            &[g(Some(1), Some("a"), Access::Read)],
            &read_only
        ));
        assert!(!set_within(
            &[g(None, None, Access::Read)],
            &[g(Some(1), None, Access::Manage)]
        ));
    }
}
