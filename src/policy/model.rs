//! The policy file as written: serde types that mirror the YAML, with positions kept for errors.
//!
//! Every struct denies unknown fields, so a typo such as `acess:` is reported, not ignored.

use std::collections::HashMap;

use marked_yaml::Spanned;
use serde::Deserialize;

/// The whole policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Format version; only `1` exists.
    pub version: Spanned<u32>,
    /// Route rules, in file order.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Role name → grants.
    #[serde(default)]
    pub roles: HashMap<Spanned<String>, Vec<Spanned<String>>>,
    /// Principal name → definition.
    #[serde(default)]
    pub principals: HashMap<Spanned<String>, PrincipalSpec>,
    /// Rate limits.
    #[serde(default)]
    pub limits: Option<LimitsSpec>,
}

/// `limits:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// The limit of every key (or token principal) whose principal names none (`100/s`).
    pub default: Option<Spanned<String>>,
}

/// One route rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// `METHOD[|METHOD...] /path/{param}/{*tail}`.
    #[serde(rename = "match")]
    pub matcher: Spanned<String>,
    /// The resource the route belongs to (required unless public).
    pub resource: Option<Spanned<String>>,
    /// Name of the path parameter that identifies the instance.
    pub instance: Option<Spanned<String>>,
    /// `read` or `write` (or `manage`).
    pub access: Option<Spanned<String>>,
    /// No key needed.
    #[serde(default)]
    pub public: Option<Spanned<bool>>,
    /// The backend reads a body on this route's GET/DELETE/OPTIONS (a search endpoint, say);
    /// without it such a body is refused, because a backend that ignores it would read it as
    /// the next request on the connection.
    #[serde(default)]
    pub allow_body: Option<Spanned<bool>>,
    /// Filter the JSON list in the answer by the caller's instance grants.
    #[serde(default)]
    pub filter: Option<Spanned<FilterSpec>>,
    /// Free text for people.
    pub description: Option<String>,
}

/// `filter:` on a route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// JSON Pointer to the array in the answer (`""` is the body itself).
    pub items: Spanned<String>,
    /// JSON Pointer, inside each item, to the value naming its instance.
    pub instance: Spanned<String>,
}

/// One principal.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSpec {
    /// `user` or `robot`.
    pub kind: Spanned<String>,
    /// Role names.
    #[serde(default)]
    pub roles: Vec<Spanned<String>>,
    /// Direct grants.
    #[serde(default)]
    pub grants: Vec<Spanned<String>>,
    /// This principal's rate limit per key (`10/s`), instead of `limits.default`.
    pub limit: Option<Spanned<String>>,
    /// Free text for people.
    pub description: Option<String>,
}
