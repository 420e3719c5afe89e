//! Request-path normalisation: the first thing the request path meets.
//!
//! The proxy and the backend must judge the same path, so the normalised path is both what the
//! matcher sees and what is forwarded. Anything that cannot be normalised without guessing how the
//! backend would read it (an encoded `/` or `\`, a NUL, a broken escape) is refused with 400.
//!
//! Double slashes are collapsed (`//a///b` → `/a/b`): most backends and routers do the same, and
//! refusing them would break clients that join URLs carelessly.

use thiserror::Error;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PathNotNormalisable {
    /// The path is not in origin form (does not start with `/`).
    #[error("the path must start with '/'")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-encoding")]
    BadEscape,
    /// `%2F`, `%5C`, a raw `\` or a NUL: the backend might split segments differently.
    #[error("encoded separator or NUL in path")]
    AmbiguousSeparator,
    /// Longer than [`MAX_PATH_LEN`].
    #[error("path too long")]
    TooLong,
    /// `..;x` or `.;x`: some servers (Tomcat, Jetty) read these as dot segments.
    #[error("dot segment with parameters")]
    DotSegmentWithParameters,
}

/// The form routes are matched in: the normalised path without a trailing slash (except `/`),
/// so `/x/` is judged exactly like `/x` and can never fall through to a broader route.
pub fn match_form(normalised: &str) -> &str {
    match normalised.strip_suffix('/') {
        Some(trimmed) if !trimmed.is_empty() => trimmed,
        _ => normalised,
    }
}

/// The longest path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 8 * 1024;

/// Normalise `raw` (the path part of the request target, no query) as described in the module
/// documentation.
pub fn normalise(raw: &str) -> Result<String, PathNotNormalisable> {
    if raw.len() > MAX_PATH_LEN {
        return Err(PathNotNormalisable::TooLong);
    }
    if !raw.starts_with('/') {
        return Err(PathNotNormalisable::NotAbsolute);
    }
    if is_already_normal(raw) {
        return Ok(raw.to_string());
    }
    let decoded = decode_unreserved(raw)?;
    let has_dot_parameters = decoded
        .split('/')
        .any(|segment| matches!(segment.split_once(';'), Some((".", _)) | Some(("..", _))));
    if has_dot_parameters {
        return Err(PathNotNormalisable::DotSegmentWithParameters);
    }
    Ok(remove_dot_segments(&decoded))
}

/// The common case, checked in one pass: no escapes, no backslash or NUL, no empty, `.` or `..`
/// segment. Such a path is its own normal form.
fn is_already_normal(raw: &str) -> bool {
    !raw.bytes().any(|b| matches!(b, b'%' | b'\\' | b';' | 0))
        && !raw.contains("//")
        && raw
            .split('/')
            .all(|segment| segment != "." && segment != "..")
}

/// Decodes escapes of unreserved characters, upper-cases the hex of the others, and refuses
/// escapes that would change segment boundaries.
fn decode_unreserved(raw: &str) -> Result<String, PathNotNormalisable> {
    let bytes = raw.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|c| hex_value(*c));
                let lo = bytes.get(i + 2).and_then(|c| hex_value(*c));
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathNotNormalisable::BadEscape);
                };
                let value = hi << 4 | lo;
                match value {
                    b'/' | b'\\' | 0 => return Err(PathNotNormalisable::AmbiguousSeparator),
                    v if is_unreserved(v) => out.push(v),
                    v => out.extend_from_slice(&[
                        b'%',
                        HEX_UPPER[usize::from(v >> 4)],
                        HEX_UPPER[usize::from(v & 0xf)],
                    ]),
                }
                i += 3;
            }
            b'\\' | 0 => return Err(PathNotNormalisable::AmbiguousSeparator),
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII was decoded and every other byte copied whole, so this is still UTF-8.
    String::from_utf8(out).map_err(|_| PathNotNormalisable::BadEscape)
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §5.2.4 on a path that starts with `/`, also dropping empty segments. A trailing `/`
/// (including one left by a final `.` or `..`) is kept, because backends treat it as meaningful.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        trailing_slash = false;
        match segment {
            "" | "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalises_the_usual_tricks() {
        let cases = [
            ("/", "/"),
            ("/v1/datasets", "/v1/datasets"),
            ("/v1/datasets/", "/v1/datasets/"),
            ("//v1///datasets", "/v1/datasets"),
            ("/v1/./datasets", "/v1/datasets"),
            ("/v1/x/../datasets", "/v1/datasets"),
            ("/../../etc", "/etc"),
            ("/v1/%2e%2e/admin", "/admin"),
            ("/v1/%2E./admin", "/admin"),
            ("/v1/data%73ets", "/v1/datasets"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/%20b", "/a/%20b"),
            ("/a/%3a", "/a/%3A"),
            ("/a/...", "/a/..."),
            ("/a;x/b;y", "/a;x/b;y"),
            ("/v1/caf\u{e9}/x/..", "/v1/caf\u{e9}/"),
        ];
        for (input, expected) in cases {
            assert_eq!(normalise(input).unwrap(), expected, "input {input}");
        }
    }

    #[test]
    fn refuses_what_cannot_be_normalised_safely() {
        use PathNotNormalisable::*;
        let cases = [
            ("v1/x", NotAbsolute),
            ("*", NotAbsolute),
            ("/a%2fb", AmbiguousSeparator),
            ("/a%2Fb", AmbiguousSeparator),
            ("/a%5cb", AmbiguousSeparator),
            ("/a\\b", AmbiguousSeparator),
            ("/a%00", AmbiguousSeparator),
            ("/a%zz", BadEscape),
            ("/a%4", BadEscape),
            ("/a%", BadEscape),
            ("/a/..;/b", DotSegmentWithParameters),
            ("/a/.;x/b", DotSegmentWithParameters),
            ("/a/%2e%2e;/b", DotSegmentWithParameters),
        ];
        for (input, expected) in cases {
            assert_eq!(normalise(input), Err(expected), "input {input}");
        }
        assert_eq!(normalise(&"/a".repeat(5000)), Err(TooLong));
    }

    #[test]
    fn match_form_drops_one_trailing_slash() {
        assert_eq!(match_form("/"), "/");
        assert_eq!(match_form("/a/"), "/a");
        assert_eq!(match_form("/a"), "/a");
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        let segment = prop::collection::vec(
            prop_oneof![
                Just("a".to_string()),
                Just(".".to_string()),
                Just("..".to_string()),
                Just("".to_string()),
                Just("%2e".to_string()),
                Just("%2E%2e".to_string()),
                Just("%41".to_string()),
                Just("%20".to_string()),
                Just("%e2%82%ac".to_string()),
                "[a-z0-9._~-]{1,4}",
            ],
            1..4,
        )
        .prop_map(|parts| parts.concat());
        prop::collection::vec(segment, 0..8).prop_map(|s| format!("/{}", s.join("/")))
    }

    proptest! {
        #[test]
        fn is_idempotent(path in path_strategy()) {
            let once = normalise(&path).unwrap();
            prop_assert_eq!(normalise(&once).unwrap(), once);
        }

        #[test]
        fn never_yields_dot_segments_or_empty_inner_segments(path in path_strategy()) {
            let out = normalise(&path).unwrap();
            prop_assert!(out.starts_with('/'));
            let inner: Vec<&str> = out.trim_end_matches('/').split('/').skip(1).collect();
            for seg in inner {
                prop_assert!(seg != "." && seg != ".." && !seg.is_empty(), "{} -> {}", path, out);
            }
        }

        #[test]
        fn the_fast_path_agrees_with_the_full_normaliser(path in path_strategy()) {
            if is_already_normal(&path) {
                let full = decode_unreserved(&path).map(|d| remove_dot_segments(&d));
                prop_assert_eq!(full, Ok(path.clone()));
            }
        }

        #[test]
        fn arbitrary_input_never_panics(path in "\\PC{0,64}") {
            let _ = normalise(&path);
        }

        #[test]
        fn output_is_a_valid_request_path(path in path_strategy()) {
            let out = normalise(&path).unwrap();
            prop_assert!(out.parse::<http::uri::PathAndQuery>().is_ok());
        }
    }
}
