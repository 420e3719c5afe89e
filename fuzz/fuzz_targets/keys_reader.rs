//! The keys-file reader (the fast streaming one, with its serde_yaml fallback) over arbitrary
//! bytes: never a panic; what it reads renders to text it reads back identically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::keys::file;

const POLICY: &str = "version: 1\nroutes:\n  - match: GET /d/{id}\n    resource: datasets\n    instance: id\n    access: read\nprincipals:\n  alice: { kind: user, grants: ['datasets:read'] }\n";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let policy = portcullis::policy::compile(POLICY).expect("fixed policy compiles");
    let _ = portcullis::keys::compile(text, &policy, None, &Default::default());
    if let Ok(parsed) = file::parse(text) {
        let rendered = file::render(&parsed);
        let back = file::parse(&rendered).expect("what we render we read");
        assert_eq!(back.keys, parsed.keys, "round trip changed the entries");
    }
});
