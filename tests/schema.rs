//! The JSON Schemas `portcullis schema policy|config` prints are the ones shipped in
//! `policies/schema/`, and every shipped example validates against them with an independent
//! validator (the `jsonschema` crate); a typo'd field does not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::BIN;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn printed(which: &str) -> serde_json::Value {
    let out = Command::new(BIN).args(["schema", which]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn yaml(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn files(pattern: &[&str], name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in pattern {
        let dir = root().join(dir);
        if dir.join(name).is_file() {
            out.push(dir.join(name));
        }
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = entry.path().join(name);
            if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}

fn check(which: &str, examples: &[PathBuf], typo: serde_json::Value) {
    let schema = printed(which);
    let shipped: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(format!("policies/schema/{which}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        schema, shipped,
        "policies/schema/{which}.json is stale: regenerate it with `portcullis schema {which} > policies/schema/{which}.json`"
    );
    assert_eq!(
        schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
        "draft 2020-12"
    );
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    assert!(examples.len() >= 3, "{examples:?}");
    for example in examples {
        let doc = yaml(example);
        let errors: Vec<String> = validator.iter_errors(&doc).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", example.display());
        let text = std::fs::read_to_string(example).unwrap();
        assert!(
            text.starts_with("# yaml-language-server: $schema="),
            "{} lacks the schema line for editors",
            example.display()
        );
    }
    assert!(!validator.is_valid(&typo), "a typo'd field passed: {typo}");
}

#[test]
fn the_policy_schema_is_shipped_and_every_example_policy_validates() {
    let mut examples = files(&["policies", "policies/examples"], "policy.yaml");
    examples.push(root().join("policies/example.yaml"));
    examples.push(root().join("policies/demo.yaml"));
    let typo = serde_json::json!({"version": 1, "routes": [{"match": "GET /x", "resource": "x", "acess": "read"}]});
    check("policy", &examples, typo);
}

#[test]
fn the_config_schema_is_shipped_and_every_example_config_validates() {
    let examples = files(&["policies/examples"], "portcullis.yaml");
    let typo = serde_json::json!({"upstream": "http://127.0.0.1:3000", "listne": ":8080"});
    check("config", &examples, typo);
}
