//! Generated benchmark inputs: policies with many routes and keys files with many keys.
//!
//! Shared by the criterion benches (`benches/hot_path.rs`) and `examples/load_keys.rs`, so the
//! numbers in `benches/README.md` all come from the same shapes. Keys are deterministic
//! (`bench_key(i)`), so a benchmark can present a key it knows is in the file.

// Each user of this module needs only part of it.
#![allow(dead_code)]

use std::fmt::Write;

/// Resource names to build realistic route paths from; beyond the list a number is appended.
const WORDS: &[&str] = &[
    "datasets",
    "jobs",
    "companies",
    "files",
    "reports",
    "invoices",
    "customers",
    "orders",
    "pipelines",
    "models",
    "dashboards",
    "alerts",
    "projects",
    "teams",
    "webhooks",
    "exports",
];

/// Routes each resource contributes to [`policy_yaml`].
pub const ROUTES_PER_RESOURCE: usize = 10;

/// The principals every generated policy defines, and the keys files use in turn.
pub const PRINCIPALS: &[&str] = &["reader", "writer", "etl-bot", "admin"];

/// The name of resource number `i`.
pub fn resource(i: usize) -> String {
    let word = WORDS[i % WORDS.len()];
    match i / WORDS.len() {
        0 => word.to_string(),
        n => format!("{word}{n}"),
    }
}

/// A policy with `routes` routes (a multiple of [`ROUTES_PER_RESOURCE`] is exact): per resource a
/// list, a create, get/update one, nested versions, a file catch-all, an action and a v2 view.
pub fn policy_yaml(routes: usize) -> String {
    let resources = routes.div_ceil(ROUTES_PER_RESOURCE).max(1);
    let mut out = String::with_capacity(resources * 1200);
    out.push_str("version: 1\nroutes:\n  - match: GET /status\n    public: true\n");
    let mut emitted = 1;
    'all: for r in 0..resources {
        let res = resource(r);
        let base = format!("/v1/orgs/{{org}}/{res}");
        let templates: [(&str, String, Option<&str>, &str); ROUTES_PER_RESOURCE] = [
            ("GET", base.clone(), None, "read"),
            ("POST", base.clone(), None, "write"),
            ("GET", format!("{base}/{{id}}"), Some("id"), "read"),
            (
                "PUT|PATCH|DELETE",
                format!("{base}/{{id}}"),
                Some("id"),
                "write",
            ),
            ("GET", format!("{base}/{{id}}/versions"), Some("id"), "read"),
            (
                "GET",
                format!("{base}/{{id}}/versions/{{version}}"),
                Some("id"),
                "read",
            ),
            (
                "POST",
                format!("{base}/{{id}}/versions"),
                Some("id"),
                "write",
            ),
            (
                "POST",
                format!("{base}/{{id}}/archive"),
                Some("id"),
                "write",
            ),
            (
                "GET",
                format!("{base}/{{id}}/files/{{*path}}"),
                Some("id"),
                "read",
            ),
            ("GET", format!("/v2/{res}/{{id}}/stats"), Some("id"), "read"),
        ];
        for (methods, path, instance, access) in templates {
            if emitted >= routes.max(2) {
                break 'all;
            }
            let _ = write!(out, "  - match: {methods} {path}\n    resource: {res}\n");
            if let Some(param) = instance {
                let _ = writeln!(out, "    instance: {param}");
            }
            let _ = writeln!(out, "    access: {access}");
            emitted += 1;
        }
    }
    let first = resource(0);
    let _ = write!(
        out,
        "roles:\n  viewer: [\"*:read\"]\n  editor: [\"*:read\", \"*:write\"]\n\
         principals:\n  reader: {{ kind: user, roles: [viewer] }}\n  \
         writer: {{ kind: user, roles: [editor] }}\n  \
         etl-bot: {{ kind: robot, grants: [\"{first}/ds_1:write\", \"{first}:read\"] }}\n  \
         admin: {{ kind: user, grants: [\"*:*\"] }}\n"
    );
    out
}

/// The plaintext of benchmark key `i`: `pcs_` + 40 alphanumerics, unique per `i`.
pub fn bench_key(i: usize) -> String {
    format!(
        "pcs_b{i:07}{:032x}",
        (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    )
}

/// The principal that owns benchmark key `i`.
pub fn bench_principal(i: usize) -> &'static str {
    PRINCIPALS[i % PRINCIPALS.len()]
}

/// A keys file with `n` keys, `bench_key(0..n)`, owned round-robin by [`PRINCIPALS`]; every
/// tenth key carries a scope, as real files mix scoped and unscoped keys.
pub fn keys_yaml(n: usize) -> String {
    let mut out = String::with_capacity(n * 200 + 32);
    out.push_str("version: 1\nkeys:\n");
    for i in 0..n {
        let key = bench_key(i);
        let _ = write!(
            out,
            "  - id: b{i:07}\n    prefix: \"{}\"\n    hash: \"{}\"\n    principal: {}\n",
            &key[..10],
            portcullis::keys::secret::hash_text(&key),
            bench_principal(i),
        );
        if i % 10 == 9 {
            out.push_str("    scopes: [\"*:read\"]\n");
        }
        out.push_str("    created: 2026-01-01T00:00:00Z\n");
    }
    out
}
