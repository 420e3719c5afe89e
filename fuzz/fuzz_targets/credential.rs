//! The credential parser over arbitrary header values: never a panic, and whatever it returns
//! as a key is non-empty text taken from one of the credential headers.
#![no_main]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portcullis::keys::credential;

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let (name, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => continue,
        };
        let name = match name.first() {
            Some(b'a') => HeaderName::from_static("authorization"),
            Some(b'x') => HeaderName::from_static("x-api-key"),
            _ => match HeaderName::from_bytes(name) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(name, v);
        }
    }
    if let Ok(Some(key)) = credential::extract(&headers) {
        assert!(!key.is_empty());
    }
    for value in headers.get_all(http::header::AUTHORIZATION) {
        let _ = credential::is_credential_authorization(value);
    }
});
