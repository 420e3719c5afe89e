//! The policy compiler over arbitrary text: never a panic, every problem has a message, and a
//! policy that compiles answers lookups for any path without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match portcullis::policy::compile(text) {
        Err(problems) => assert!(problems.iter().all(|p| !p.message.is_empty())),
        Ok(policy) => {
            for path in ["/", "/v1/datasets/x", "/a/b/c/d", "/v1/DATASETS/Latest.json"] {
                for method in [http::Method::GET, http::Method::HEAD, http::Method::POST] {
                    let _ = policy.lookup(&method, path);
                    let _ = policy.lookup_folded(&method, &portcullis::path::fold_case(path));
                }
            }
        }
    }
});
