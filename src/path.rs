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
    /// A byte outside printable ASCII: it must be percent-encoded (Spring's `StrictHttpFirewall`
    /// refuses the same), so every backend sees the same characters.
    #[error("a character outside printable ASCII (percent-encode it)")]
    NotPrintableAscii,
    /// A `;` while `backend.matrix_parameters` is `reject`: Tomcat, Jetty and Spring strip
    /// `;params` from segments, so `/x/latest;a` may reach the handler of `/x/latest`.
    #[error("a ';' in the path (matrix parameters are refused)")]
    Semicolon,
}

/// What the backend does with `;params` in path segments (`backend.matrix_parameters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatrixParameters {
    /// Refuse any `;` in the path with 400 (the default, as Spring's `StrictHttpFirewall`).
    #[default]
    Reject,
    /// The backend strips them (Tomcat, Jetty, Spring): judge the stripped reading too.
    Strip,
    /// The backend treats `;` as an ordinary character.
    Literal,
}

/// How the backend might read a path differently from the proxy (`backend:` in
/// `portcullis.yaml`). Every reading a backend could apply is judged; a request passes only
/// when all of them are allowed, so the backend never runs a handler the key was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendReading {
    /// Static segments may match in any case (Express by default, ASP.NET, Spring with
    /// case-insensitive matching; Java's `equalsIgnoreCase` also folds `ſ`, `ı`, `İ`, `K`).
    pub case_insensitive: bool,
    /// A `.ext` on the last segment may be read as a format (Rails `(.:format)`, Spring's old
    /// suffix matching): `/x/latest.json` may reach the handler of `/x/latest`.
    pub format_suffixes: bool,
    /// What happens to `;params`.
    pub matrix_parameters: MatrixParameters,
}

impl Default for BackendReading {
    fn default() -> Self {
        BackendReading {
            case_insensitive: true,
            format_suffixes: true,
            matrix_parameters: MatrixParameters::Reject,
        }
    }
}

/// Another way a backend may read the request path: judged against the case-folded route table
/// when `folded`, against the ordinary one otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alternative {
    /// The path in match form as that backend would route it.
    pub path: String,
    /// Static segments compared case-insensitively (the path is already folded).
    pub folded: bool,
}

/// Normalises `raw` and applies the `;` rule of `reading`.
pub fn normalise_for(raw: &str, reading: &BackendReading) -> Result<String, PathNotNormalisable> {
    let path = normalise(raw)?;
    if reading.matrix_parameters == MatrixParameters::Reject && path.contains(';') {
        return Err(PathNotNormalisable::Semicolon);
    }
    Ok(path)
}

/// The readings of a path in match form that a backend described by `reading` could apply
/// besides the literal one, each combination of case folding, format-suffix and matrix-parameter
/// stripping once. Empty (and allocation-free) for the usual lower-case path without `.` or `;`.
pub fn alternatives(path: &str, reading: &BackendReading) -> Vec<Alternative> {
    let strip_matrix = reading.matrix_parameters == MatrixParameters::Strip && path.contains(';');
    let fold = reading.case_insensitive && needs_folding(path);
    let last = path.rsplit('/').next().unwrap_or("");
    let strip_format = reading.format_suffixes && last.get(1..).is_some_and(|l| l.contains('.'));
    if !(strip_matrix || fold || strip_format) {
        return Vec::new();
    }
    let mut out: Vec<Alternative> = Vec::new();
    for mask in 1u8..8 {
        let (m, f, c) = (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0);
        if (m && !strip_matrix) || (f && !strip_format) || (c && !fold) {
            continue;
        }
        let mut p = if m {
            without_matrix(path)
        } else {
            path.to_string()
        };
        if f {
            p = without_format(&p);
        }
        if c {
            p = fold_case(&p);
        }
        let alternative = Alternative { path: p, folded: c };
        if alternative.path != path && !out.contains(&alternative) {
            out.push(alternative);
        }
    }
    out
}

/// Whether case folding could change how `path` matches: ASCII capitals, or an escape that may
/// decode to one of the characters that fold into ASCII.
fn needs_folding(path: &str) -> bool {
    has_letter_capitals(path)
        || path.contains("%C4%B")
        || path.contains("%C5%BF")
        || path.contains("%E2%84%AA")
}

/// Capitals outside percent escapes (the hex of an escape is upper case after normalisation).
fn has_letter_capitals(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            i += 3;
            continue;
        }
        if bytes[i].is_ascii_uppercase() {
            return true;
        }
        i += 1;
    }
    false
}

/// Lower case, with the escaped characters that Java's `equalsIgnoreCase` folds into ASCII
/// (`ı` and `İ` to `i`, `ſ` to `s`, the Kelvin sign to `k`) decoded to their ASCII letter.
pub fn fold_case(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(c) = rest.chars().next() {
        let (folded, used) = match rest.as_bytes() {
            [b'%', b'C', b'4', b'%', b'B', b'0' | b'1', ..] => ('i', 6),
            [b'%', b'C', b'5', b'%', b'B', b'F', ..] => ('s', 6),
            [b'%', b'E', b'2', b'%', b'8', b'4', b'%', b'A', b'A', ..] => ('k', 9),
            [b'%', a, b, ..] => {
                out.push('%');
                out.push(char::from(*a));
                out.push(char::from(*b));
                rest = &rest[3..];
                continue;
            }
            _ => (c.to_ascii_lowercase(), c.len_utf8()),
        };
        out.push(folded);
        rest = &rest[used..];
    }
    out
}

/// Every segment without its `;params`, as Tomcat and Jetty route it.
fn without_matrix(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment.split(';').next().unwrap_or(""));
    }
    out
}

/// The last segment cut at its first `.` (not a leading one), as Rails reads `(.:format)`.
fn without_format(path: &str) -> String {
    let start = path.rfind('/').map_or(0, |i| i + 1);
    let last = &path[start..];
    match last.get(1..).and_then(|l| l.find('.')) {
        Some(dot) => path[..start + 1 + dot].to_string(),
        None => path.to_string(),
    }
}

/// A value (an instance named in a JSON answer, say) in the form a normalised request path
/// carries it in one segment: unreserved characters, sub-delimiters, `:` and `@` as they are,
/// every other byte percent-encoded with upper-case hex.
pub fn segment_form(value: &str) -> std::borrow::Cow<'_, str> {
    let literal = |b: u8| is_unreserved(b) || b"!$&'()*+,;=:@".contains(&b);
    if value.bytes().all(literal) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for b in value.bytes() {
        if literal(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    std::borrow::Cow::Owned(out)
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
    if raw.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(PathNotNormalisable::NotPrintableAscii);
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
            ("/v1/caf%C3%A9/x/..", "/v1/caf%C3%A9/"),
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
            ("/v1/caf\u{e9}", NotPrintableAscii),
            ("/a b", NotPrintableAscii),
            ("/a\u{7f}", NotPrintableAscii),
        ];
        for (input, expected) in cases {
            assert_eq!(normalise(input), Err(expected), "input {input}");
        }
        assert_eq!(normalise(&"/a".repeat(5000)), Err(TooLong));
    }

    #[test]
    fn semicolons_are_refused_unless_the_backend_is_described_otherwise() {
        let strict = BackendReading::default();
        assert_eq!(
            normalise_for("/a/latest;x", &strict),
            Err(PathNotNormalisable::Semicolon)
        );
        let literal = BackendReading {
            matrix_parameters: MatrixParameters::Literal,
            ..strict
        };
        assert_eq!(
            normalise_for("/a/latest;x", &literal).unwrap(),
            "/a/latest;x"
        );
    }

    #[test]
    fn alternatives_cover_every_backend_reading() {
        let all = BackendReading {
            matrix_parameters: MatrixParameters::Strip,
            ..BackendReading::default()
        };
        let paths = |p: &str| -> Vec<(String, bool)> {
            alternatives(p, &all)
                .into_iter()
                .map(|a| (a.path, a.folded))
                .collect()
        };
        assert!(paths("/v1/datasets/ds_1").is_empty());
        assert_eq!(
            paths("/v1/datasets/LATEST"),
            vec![("/v1/datasets/latest".into(), true)]
        );
        assert_eq!(
            paths("/v1/datasets/latest.json"),
            vec![("/v1/datasets/latest".into(), false)]
        );
        assert_eq!(paths("/v1/datasets/.hidden"), vec![]);
        assert_eq!(
            paths("/v1/datasets/latest;x"),
            vec![("/v1/datasets/latest".into(), false)]
        );
        let mixed = paths("/v1/Datasets;a/Latest.JSON;b");
        assert!(
            mixed.contains(&("/v1/datasets/latest".into(), true)),
            "{mixed:?}"
        );
        assert!(
            mixed.contains(&("/v1/Datasets/Latest".into(), false)),
            "{mixed:?}"
        );
        assert_eq!(mixed.len(), 7, "{mixed:?}");
        assert_eq!(
            paths("/v1/x/late%C5%BFt"),
            vec![("/v1/x/latest".into(), true)]
        );
        assert_eq!(paths("/v1/x/%E2%84%AAey"), vec![("/v1/x/key".into(), true)]);
        assert_eq!(
            paths("/v1/x/caf%C3%A9"),
            vec![],
            "escapes alone are not capitals"
        );
        let none = BackendReading {
            case_insensitive: false,
            format_suffixes: false,
            matrix_parameters: MatrixParameters::Literal,
        };
        assert!(alternatives("/v1/A;b/c.json", &none).is_empty());
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

        /// Found by fuzzing: only a target hyper accepts (no fragment, no query) must stay
        /// acceptable; the normaliser itself never turns an acceptable path into a bad one.
        #[test]
        fn an_acceptable_target_stays_acceptable(tail in "[!-~]{0,40}") {
            let raw = format!("/{tail}");
            let accepted = raw
                .parse::<http::uri::PathAndQuery>()
                .is_ok_and(|pq| pq.as_str() == raw);
            if let (true, Ok(out)) = (accepted, normalise(&raw)) {
                prop_assert!(out.parse::<http::uri::PathAndQuery>().is_ok(), "{} -> {}", raw, out);
            }
        }

        #[test]
        fn output_is_a_valid_request_path(path in path_strategy()) {
            let out = normalise(&path).unwrap();
            prop_assert!(out.parse::<http::uri::PathAndQuery>().is_ok());
        }
    }
}
