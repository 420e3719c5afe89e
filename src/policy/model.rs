//! The policy file as written: serde types that mirror the YAML, with positions kept for errors.
//!
//! Every struct denies unknown fields, so a typo such as `acess:` is reported, not ignored.

use std::collections::HashMap;

use marked_yaml::Spanned;
use serde::Deserialize;

/// The whole policy file.
#[derive(schemars::JsonSchema, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Format version; only `1` exists.
    #[schemars(with = "u32")]
    pub version: Spanned<u32>,
    /// Route rules, in file order.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Role name → grants.
    #[serde(default)]
    #[schemars(with = "HashMap<String, Vec<String>>")]
    pub roles: HashMap<Spanned<String>, Vec<Spanned<String>>>,
    /// Principal name → definition.
    #[serde(default)]
    #[schemars(with = "HashMap<String, PrincipalSpec>")]
    pub principals: HashMap<Spanned<String>, PrincipalSpec>,
    /// Rate limits.
    #[serde(default)]
    pub limits: Option<LimitsSpec>,
}

/// `limits:`.
#[derive(schemars::JsonSchema, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// The limit of every key (or token principal) whose principal names none (`100/s`).
    #[schemars(with = "Option<String>")]
    pub default: Option<Spanned<String>>,
}

/// One route rule.
#[derive(schemars::JsonSchema, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// `METHOD[|METHOD...] /path/{param}/{*tail}`.
    #[serde(rename = "match")]
    #[schemars(with = "String")]
    pub matcher: Spanned<String>,
    /// The resource the route belongs to (required unless public).
    #[schemars(with = "Option<String>")]
    pub resource: Option<Spanned<String>>,
    /// Name of the path parameter that identifies the instance.
    #[schemars(with = "Option<String>")]
    pub instance: Option<Spanned<String>>,
    /// `read` or `write` (or `manage`).
    #[schemars(with = "Option<String>")]
    pub access: Option<Spanned<String>>,
    /// No key needed.
    #[serde(default)]
    #[schemars(with = "Option<bool>")]
    pub public: Option<Spanned<bool>>,
    /// The backend reads a body on this route's GET/DELETE/OPTIONS (a search endpoint, say);
    /// without it such a body is refused, because a backend that ignores it would read it as
    /// the next request on the connection.
    #[serde(default)]
    #[schemars(with = "Option<bool>")]
    pub allow_body: Option<Spanned<bool>>,
    /// Filter the JSON list in the answer by the caller's instance grants.
    #[serde(default)]
    #[schemars(with = "Option<FilterSpec>")]
    pub filter: Option<Spanned<FilterSpec>>,
    /// Free text for people.
    pub description: Option<String>,
}

/// `filter:` on a route.
#[derive(schemars::JsonSchema, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// JSON Pointer to the array in the answer (`""` is the body itself).
    #[schemars(with = "String")]
    pub items: Spanned<String>,
    /// JSON Pointer, inside each item, to the value naming its instance.
    #[schemars(with = "String")]
    pub instance: Spanned<String>,
}

/// One principal.
#[derive(schemars::JsonSchema, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSpec {
    /// `user` or `robot`.
    #[schemars(with = "String")]
    pub kind: Spanned<String>,
    /// Role names.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub roles: Vec<Spanned<String>>,
    /// Direct grants.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub grants: Vec<Spanned<String>>,
    /// This principal's rate limit per key (`10/s`), instead of `limits.default`.
    #[schemars(with = "Option<String>")]
    pub limit: Option<Spanned<String>>,
    /// Free text for people.
    pub description: Option<String>,
}

/// The JSON Schema (draft 2020-12) of a policy file, generated from the types that read it.
pub fn schema() -> serde_json::Value {
    let mut schema = schemars::schema_for!(PolicyFile);
    schema.insert("title".into(), "portcullis policy".into());
    schema.insert(
        "$id".into(),
        "https://portcullis.dev/schema/policy.json".into(),
    );
    schema.to_value()
}
