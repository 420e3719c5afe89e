//! The path normaliser and the backend readings: never a panic; a normalised path is its own
//! normal form, a valid request path, free of dot segments; every alternative reading is again
//! a path that starts with `/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::path::{self, BackendReading, MatrixParameters};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let strip = BackendReading {
        matrix_parameters: MatrixParameters::Strip,
        ..BackendReading::default()
    };
    let _ = path::normalise_for(raw, &BackendReading::default());
    let Ok(once) = path::normalise(raw) else { return };
    assert_eq!(path::normalise(&once).as_deref(), Ok(once.as_str()), "not idempotent: {raw:?}");
    // What hyper accepts as a request target stays a valid one after normalisation.
    let accepted = raw
        .parse::<http::uri::PathAndQuery>()
        .is_ok_and(|pq| pq.as_str() == raw);
    if accepted {
        assert!(once.parse::<http::uri::PathAndQuery>().is_ok(), "{raw:?} -> {once:?}");
    }
    let inner = once.trim_end_matches('/');
    for segment in inner.split('/').skip(1) {
        assert!(segment != "." && segment != ".." && !segment.is_empty(), "{raw:?} -> {once:?}");
    }
    for alternative in path::alternatives(path::match_form(&once), &strip) {
        assert!(alternative.path.starts_with('/'), "{alternative:?}");
        assert_eq!(path::fold_case(&path::fold_case(&alternative.path)), path::fold_case(&alternative.path));
    }
});
